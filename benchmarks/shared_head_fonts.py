"""What the shared head learns on glyphs: font style, a nuisance for character retrieval?

A glyphs class is one character rendered in many fonts, so the characteristics that
classes share are mostly font style. This diagnostic trains benchmark rows (the same
protocol and flags as ``accuracy.py``) and measures, on the test embeddings of each part
(the class head, the shared head, their concatenation; one embedding for a baseline):

- ``map_at_r``, ``recall_at_1``: character retrieval, as the accuracy benchmark scores it;
- ``font_match_at_10``: of each image's 10 nearest neighbours among images of *other*
  classes, the fraction rendered in the same font as the image; ``font_chance`` is the
  same fraction for neighbours drawn at random from the other classes.

Every part is measured before training too (stage ``init``). Results:
``benchmarks/results/glyphs-shared-head-fonts.{csv,md}``.

    python benchmarks/shared_head_fonts.py   # margin m=2 with and without the shared head
"""

import argparse
import concurrent.futures
import csv
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import accuracy
import numpy as np
import torch

COLUMNS = "method seed stage part map_at_r recall_at_1 font_match_at_10 font_chance"
COLUMNS = COLUMNS.split()
DEFAULT_METHODS = ("margin m=2", "margin+shared m=2")


def font_match_at_k(
    embeddings: torch.Tensor,
    labels: np.ndarray,
    fonts: np.ndarray,
    k: int = 10,
    chunk: int = 1024,
) -> float:
    """Mean fraction of the k nearest other-class neighbours (cosine) in the query's font."""
    embeddings = torch.nn.functional.normalize(embeddings.float(), dim=1)
    labels_t, fonts_t = torch.as_tensor(labels), torch.as_tensor(fonts)
    matches = []
    for start in range(0, len(embeddings), chunk):
        query = slice(start, start + chunk)
        sims = embeddings[query] @ embeddings.T
        sims[labels_t[query, None] == labels_t[None]] = -float("inf")
        nearest = sims.topk(k, dim=1).indices
        matches.append((fonts_t[nearest] == fonts_t[query, None]).float().mean(1))
    return torch.cat(matches).mean().item()


def font_chance(labels: np.ndarray, fonts: np.ndarray) -> float:
    """The same fraction for neighbours drawn uniformly from the other classes."""
    _, classes = np.unique(labels, return_inverse=True)
    per_class_font = np.zeros((classes.max() + 1, fonts.max() + 1))
    np.add.at(per_class_font, (classes, fonts), 1)
    same_font = per_class_font.sum(0)[fonts] - per_class_font[classes, fonts]
    other_class = len(labels) - per_class_font.sum(1)[classes]
    return float(np.mean(same_font / other_class))


def font_indices(dataset) -> np.ndarray:
    """The glyphs font index of every image of ``dataset`` (or of the example's subset)."""
    if hasattr(dataset, "font_indices"):
        return dataset.font_indices
    return dataset.dataset.font_indices[dataset.indices]


def measure(example, args, models, test_dataset, method, stage) -> List[dict]:
    """One CSV record per part of the models' test embeddings."""
    tester = example.build_tester(args)
    for model in models.values():
        model.eval()
    with torch.no_grad(), example._quiet_pml():
        embeddings, labels = tester.get_all_embeddings(
            test_dataset, models["trunk"], models["embedder"]
        )
    labels = labels[:, 0].cpu().numpy()
    fonts = font_indices(test_dataset)
    sizes = getattr(models["embedder"], "embedding_sizes", None)
    parts = {"embedding": embeddings}
    if sizes is not None:
        class_part, shared_part = embeddings.split(list(sizes), dim=1)
        parts = {"class": class_part, "shared": shared_part, "concat": embeddings}
    calculator = example.build_accuracy_calculator(args)
    chance = font_chance(labels, fonts)
    records = []
    for part, values in parts.items():
        values = torch.nn.functional.normalize(values, dim=1)
        scores = calculator.get_accuracy(values, labels)
        records.append(
            {
                "method": method,
                "seed": args.seed,
                "stage": stage,
                "part": part,
                "map_at_r": f"{100 * scores['mean_average_precision_at_r']:.3f}",
                "recall_at_1": f"{100 * scores['recall_at_1']:.3f}",
                "font_match_at_10": f"{100 * font_match_at_k(values, labels, fonts):.3f}",
                "font_chance": f"{100 * chance:.3f}",
            }
        )
    return records


def run_one(method: str, seed: int, extra: Sequence[str]) -> List[dict]:
    """Trains one benchmark row and seed as ``accuracy.py`` does; measures before/after."""
    example = accuracy.example_module()
    row = next(
        r for r in accuracy.ROWS + accuracy.SUPPLEMENTARY_ROWS if r.method == method
    )
    args = example.parse_args(accuracy.row_argv(row, "glyphs", seed, extra))
    example.seed_everything(args.seed)
    torch.set_num_threads(args.num_threads)
    train_dataset, test_dataset = example.build_datasets(args)
    models = example.build_model(args)
    setup = example.build_loss(args, example.count_classes(train_dataset))
    optimizers, schedulers = example.build_optimizers(args, models, setup.loss_funcs)
    trainer = example.build_trainer(
        args, models, optimizers, setup, train_dataset, schedulers
    )
    records = measure(example, args, models, test_dataset, method, "init")
    with example._quiet_pml():
        trainer.train(num_epochs=args.epochs)
    return records + measure(example, args, models, test_dataset, method, "trained")


def summarise(records: List[dict]) -> str:
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["stage"], r["part"]), []).append(r)
    lines = [
        "# glyphs: what the shared head encodes (benchmarks/shared_head_fonts.py)",
        "",
        "Mean ± std over seeds (%). font match@10: share of the 10 nearest other-class",
        "neighbours in the query's font; chance: the same share at random.",
        "",
        "| method | stage | part | seeds | MAP@R | R@1 | font match@10 | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, stage, part), rows in groups.items():
        cells = [accuracy.mean_std([float(r[c]) for r in rows]) for c in COLUMNS[4:]]
        lines.append(
            f"| {method} | {stage} | {part} | {len(rows)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] = None) -> int:
    example = accuracy.example_module()
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=example.HelpFormatter
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="rows of accuracy.py to train and measure",
    )
    parser.add_argument(
        "--seeds", type=example.numpy_seed, nargs="+", default=[0, 1, 2], help="seeds"
    )
    parser.add_argument("--data-root", default="data", help="the datasets' folder")
    parser.add_argument(
        "--results-dir",
        default=str(accuracy.HERE / "results"),
        help="where the CSV and summary go",
    )
    parser.add_argument(
        "--jobs", type=example.positive(int), default=2, help="runs in parallel"
    )
    args = parser.parse_args(argv)
    rows = {r.method: r for r in accuracy.ROWS + accuracy.SUPPLEMENTARY_ROWS}
    if set(args.methods) - set(rows):
        parser.error(f"unknown methods {sorted(set(args.methods) - set(rows))}")
    extra = ["--data-root", args.data_root, "--num-threads", "1"] + accuracy.PROTOCOL
    results_dir = Path(args.results_dir)
    path = results_dir / "glyphs-shared-head-fonts.csv"
    records = []
    if path.exists():
        with path.open() as f:
            records = list(csv.DictReader(f))
    done = {(r["method"], int(r["seed"])) for r in records}
    todo = [(m, s) for m in args.methods for s in args.seeds if (m, s) not in done]
    try:  # a bad seed is a usage error now, not a failed run later
        for m, s in todo:
            accuracy.check_flags(rows[m], "glyphs", s, extra)
    except ValueError as e:
        parser.error(str(e))
    results_dir.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, m, s, extra) for m, s in todo]
        for future in concurrent.futures.as_completed(futures):
            new = future.result()
            accuracy.append_records(path, new, COLUMNS)
            records += new
            for r in new:
                print(" ".join(f"{c}={r[c]}" for c in COLUMNS), flush=True)
    path.with_suffix(".md").write_text(summarise(records))
    print(f"wrote {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
