"""Accuracy of every method against its PML baseline, over seeds, under one protocol.

Every run is the example (`examples/cub_proxyanchor.py`) with the same trunk, embedding
size, sampler, epochs, learning rates and seeds; only the rows' own flags differ. Results:

    benchmarks/results/<dataset>.csv   one row per run (resumable: finished runs are skipped)
    benchmarks/results/<dataset>.md    mean +- std per method, and the paired MAP@R difference
                                       (same seed, with and without) for every counterpart
    benchmarks/results/<dataset>.png   MAP@R and R@1 bars with std error bars
    benchmarks/results/<dataset>-heads.csv  shared-head rows: the other weightings of the
                                       two heads (the class head alone, ...), per run

    python benchmarks/accuracy.py                  # glyphs, all rows, seeds 0 1 2
    python benchmarks/accuracy.py --supplementary  # the extra rows (one flag changed)
    python benchmarks/accuracy.py --quick          # a <= 3 minute smoke run (CI)
    python benchmarks/accuracy.py --sweep --seeds 0  # PS settings for ProxyAnchor (one seed)
    python benchmarks/accuracy.py --dataset cub --data-root data   # also cars196, sop

Flags after -- go to every run. Each run's command line is parsed by the example before
any run starts, so a flag it refuses is a usage error, not a run that fails later.

On CUB-200-2011, Cars196 and SOP (PML's dataset classes, when their data is under
--data-root) every row uses the example's recipe for photos (ResNet-50, 224 px, batch 180,
60 epochs, ...): a GPU job, far beyond this project's CPU machine.
"""

import argparse
import concurrent.futures
import contextlib
import csv
import functools
import importlib.util
import io
import itertools
import logging
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "cub_proxyanchor.py"
COLUMNS = (
    "dataset method loss ps shared_head seed recall_at_1 recall_at_2 recall_at_4 "
    "recall_at_8 map_at_r r_precision nmi train_seconds"
).split()
# the example's results.json "heads": weightings of a shared-head run besides the
# concatenation, which the main CSV holds
HEAD_COLUMNS = ["dataset", "method", "seed", "weighting"]
METRICS = {  # CSV column -> the example's metric name
    "recall_at_1": "recall_at_1",
    "recall_at_2": "recall_at_2",
    "recall_at_4": "recall_at_4",
    "recall_at_8": "recall_at_8",
    "map_at_r": "mean_average_precision_at_r",
    "r_precision": "r_precision",
    "nmi": "NMI",
}


class Row(NamedTuple):
    method: str
    loss: str
    ps: bool
    shared_head: bool
    baseline: str  # the method this row is compared with ("" for baselines)
    flags: tuple = ()  # more example flags of this row only


PROXY_LOSSES = (
    "proxy_anchor",
    "normalized_softmax",
    "proxy_nca",
    "arcface",
    "cosface",
    "soft_triple",
)
ROWS: List[Row] = []
for _loss in PROXY_LOSSES:
    ROWS.append(Row(_loss, _loss, False, False, ""))
    ROWS.append(Row(f"{_loss}+ps", _loss, True, False, _loss))
ROWS += [
    Row("margin", "margin", False, False, ""),
    Row("margin+shared", "margin", False, True, "margin"),
    Row("proxy_anchor+ps+shared", "proxy_anchor", True, True, "proxy_anchor"),
]


def _ps_row(loss: str, tag: str, baseline: str, flags: tuple) -> Row:
    """The PS row ``<loss>+ps <tag>`` with ``flags``, paired with ``baseline``."""
    return Row(f"{loss}+ps {tag}", loss, True, False, baseline, flags)


def _with_and_without_ps(loss: str, tag: str, flags: tuple) -> List[Row]:
    """A baseline row and its PS counterpart, both with ``flags``."""
    base = f"{loss} {tag}"
    return [Row(base, loss, False, False, "", flags), _ps_row(loss, tag, base, flags)]


def _with_and_without_shared(tag: str, flags: tuple) -> List[Row]:
    """The margin baseline ``margin <tag>`` and its shared-head counterpart, both with
    ``flags``."""
    base = f"margin {tag}"
    return [
        Row(base, "margin", False, False, "", flags),
        Row(f"margin+shared {tag}", "margin", False, True, base, flags),
    ]


# Rows beyond the list, run only with --supplementary (or by name in --methods);
# each changes one flag of the protocol, named in its method.
M_PER_CLASS_2 = ("--sampler", "m_per_class", "--m-per-class", "2")
NCA_SCALE_12 = ("--loss-kwargs", '{"softmax_scale": 12}')
SCALE_23 = ("--loss-kwargs", '{"scale": 23}')
EPOCHS_16 = ("--epochs", "16")
EPOCHS_32 = ("--epochs", "32")
EPOCHS_64 = ("--epochs", "64")
EPOCHS_128 = ("--epochs", "128")
EPOCHS_256 = ("--epochs", "256")
# the official schedule's shape: one lr decay x0.1 part-way (epoch 50 of 130 there; its
# curves show PS pulling ahead only after it), here at epoch 16 of 32
DECAY_AT_16_OF_32 = EPOCHS_32 + ("--lr-decay-step", "16", "--lr-decay-gamma", "0.1")
SMALL_TRAIN_SET = ("--max-train-images", "4000") + EPOCHS_32
SMALLER_TRAIN_SET = ("--max-train-images", "2000", "--epochs", "64")
# 200 of the glyphs' characters, split in half: 100 training classes (4965 images) and
# 100 test classes, about CUB's size; 26 epochs are about the protocol's 1000 steps
CUB_SIZED = ("--glyphs-option", "max_classes=200", "--epochs", "26")
CUB_SIZED_TAG = "classes=100+100 epochs=26"
# ProxyAnchor's positive term over the real proxies only (no synthetic positives)
REAL_ONLY = ("--ps-positive-divisor", "real_only")
# ProxyAnchor + PS with the synthetic classes as negatives of non-parent classes only
NEGATIVES_ONLY = ("--ps-exclude-parents",) + REAL_ONLY
# synthetic classes left out of their parents' negatives, mixed with lam ~ Beta(2, 2)
EXCLUDE_PARENTS_BETA_2 = ("--ps-exclude-parents", "--ps-alpha", "2")
# the Proxy-Anchor paper's recipe where it applies to the glyphs trunk (the PS paper's
# "exceptional settings" for its ProxyAnchor row probably follow it): 512-d embeddings,
# batch 180, the sum of average and max pooling (its warm-up, a frozen trunk, is not
# meaningful for a trunk trained from scratch)
PA_RECIPE = ("--embedding-size", "512", "--batch-size", "180", "--pooling", "avg+max")
SUPPLEMENTARY_ROWS: List[Row] = [
    # the example's ProxyAnchor default is mu = 0.25 (see the sweep); the paper's mu = 1:
    _ps_row("proxy_anchor", "mu=1", "proxy_anchor", ("--ps-mu", "1")),
    # synthetic classes left out of their parents' negatives (--ps-exclude-parents)
    _ps_row(
        "proxy_anchor",
        "mu=1 exclude-parents",
        "proxy_anchor",
        ("--ps-mu", "1", "--ps-exclude-parents"),
    ),
    _ps_row(
        "proxy_anchor", "exclude-parents", "proxy_anchor", ("--ps-exclude-parents",)
    ),
    # ... and, in addition, without the synthetic proxies' positive term (synthetic
    # classes as negatives only)
    _ps_row(
        "proxy_anchor", "exclude-parents real-only", "proxy_anchor", NEGATIVES_ONLY
    ),
    _ps_row(
        "proxy_anchor",
        "mu=1 exclude-parents real-only",
        "proxy_anchor",
        ("--ps-mu", "1") + NEGATIVES_ONLY,
    ),
    # PML's ProxyNCALoss has softmax_scale 1; the official PS code uses 10-12 (README: 12)
    Row("proxy_nca scale=12", "proxy_nca", False, False, "", NCA_SCALE_12),
    _ps_row("proxy_nca", "scale=12", "proxy_nca scale=12", NCA_SCALE_12),
    # PS over ProxyAnchor with a 10x lower proxy learning rate (default mult 100), or
    # ProxyAnchor's scale alpha lowered, each against its own baseline (sweep notes:
    # "not tried")
    *_with_and_without_ps(
        "proxy_anchor", "proxy-lr-mult=10", ("--proxy-lr-mult", "10")
    ),
    *_with_and_without_ps("proxy_anchor", "alpha=16", ("--proxy-anchor-alpha", "16")),
    _ps_row(
        "proxy_anchor",
        "alpha=16 exclude-parents",
        "proxy_anchor alpha=16",
        ("--proxy-anchor-alpha", "16", "--ps-exclude-parents"),
    ),
    *_with_and_without_ps("proxy_anchor", "alpha=8", ("--proxy-anchor-alpha", "8")),
    # the setting that made PS level with ProxyAnchor (parents excluded, synthetic
    # classes as negatives only) at alpha 16, and with twice the epochs (PS is a
    # regulariser; benchmark-notes.md saw its effect grow with training length)
    _ps_row(
        "proxy_anchor",
        "alpha=16 exclude-parents real-only",
        "proxy_anchor alpha=16",
        ("--proxy-anchor-alpha", "16") + NEGATIVES_ONLY,
    ),
    Row("proxy_anchor epochs=16", "proxy_anchor", False, False, "", EPOCHS_16),
    _ps_row(
        "proxy_anchor",
        "epochs=16 exclude-parents real-only",
        "proxy_anchor epochs=16",
        EPOCHS_16 + NEGATIVES_ONLY,
    ),
    # ... and with four times the epochs, where benchmark-notes.md saw the official PS's
    # harm shrink; the official PS at the example's default beside it
    *_with_and_without_ps("proxy_anchor", "epochs=32", EPOCHS_32),
    _ps_row(
        "proxy_anchor",
        "epochs=32 exclude-parents real-only",
        "proxy_anchor epochs=32",
        EPOCHS_32 + NEGATIVES_ONLY,
    ),
    # eight times: the baseline still improved from 16 to 32 epochs, and the official
    # PS's harm was still shrinking
    *_with_and_without_ps("proxy_anchor", "epochs=64", EPOCHS_64),
    # sixteen times: the baseline still improved from 32 to 64 epochs, and the gap
    # narrowed by 0.2-0.35 points per doubling
    *_with_and_without_ps("proxy_anchor", "epochs=128", EPOCHS_128),
    # and 32 times: whether the baseline starts to overfit
    *_with_and_without_ps("proxy_anchor", "epochs=256", EPOCHS_256),
    *_with_and_without_ps("proxy_anchor", "epochs=32 decay@16", DECAY_AT_16_OF_32),
    *_with_and_without_ps("proxy_anchor", "pa-recipe", PA_RECIPE),
    _ps_row(
        "proxy_anchor",
        "pa-recipe mu=1",
        "proxy_anchor pa-recipe",
        PA_RECIPE + ("--ps-mu", "1"),
    ),
    _ps_row(
        "proxy_anchor",
        "epochs=32 decay@16 exclude-parents real-only",
        "proxy_anchor epochs=32 decay@16",
        DECAY_AT_16_OF_32 + NEGATIVES_ONLY,
    ),
    # the contrast: a loss PS helps at 8 epochs, trained four times as long
    *_with_and_without_ps("normalized_softmax", "epochs=32", EPOCHS_32),
    # PML's ArcFace and CosFace use scale 64; the official PS code's Norm-SoftMax uses 23
    # (README), and PS helped the softmax losses run at about that scale here
    *_with_and_without_ps("arcface", "scale=23", SCALE_23),
    *_with_and_without_ps("cosface", "scale=23", SCALE_23),
    # synthetic classes left out of their parents' negatives, for the other losses that
    # support it (for the margin losses the parent pairs contradict the margin)
    *(
        _ps_row(loss, "exclude-parents", loss, ("--ps-exclude-parents",))
        for loss in ("arcface", "cosface", "normalized_softmax", "proxy_nca")
    ),
    # ... at the lower scale as well (both changes helped the softmax losses here)
    _ps_row(
        "cosface",
        "scale=23 exclude-parents",
        "cosface scale=23",
        SCALE_23 + ("--ps-exclude-parents",),
    ),
    # ProxyAnchor with synthetic classes as negatives only, mixed with lam ~ Beta(2, 2)
    # (mostly near 0.5) instead of Beta(0.4, 0.4) (mostly near 0 or 1): synthetic rows
    # then fill the gaps between their parents rather than sit next to one of them
    _ps_row(
        "proxy_anchor",
        "exclude-parents real-only ps-alpha=2",
        "proxy_anchor",
        NEGATIVES_ONLY + ("--ps-alpha", "2"),
    ),
    # CosFace, the one softmax loss still level with PS once parents are excluded:
    # lam ~ Beta(2, 2), with and without the parents excluded (synthetic classes away
    # from their parents contradict the margin less), and twice the synthetic classes
    _ps_row("cosface", "ps-alpha=2", "cosface", ("--ps-alpha", "2")),
    _ps_row(
        "cosface",
        "exclude-parents mu=2",
        "cosface",
        ("--ps-exclude-parents", "--ps-mu", "2"),
    ),
    # parents excluded and lam ~ Beta(2, 2), the setting that lifted CosFace, for the
    # other losses that support exclusion (ProxyAnchor with its synthetic positives)
    *(
        _ps_row(loss, "exclude-parents ps-alpha=2", loss, EXCLUDE_PARENTS_BETA_2)
        for loss in ("cosface", "arcface", "proxy_nca", "proxy_anchor")
    ),
    _ps_row(
        "cosface",
        "scale=23 exclude-parents ps-alpha=2",
        "cosface scale=23",
        SCALE_23 + EXCLUDE_PARENTS_BETA_2,
    ),
    # ProxyAnchor without the synthetic proxies' positive term but with the parent
    # pairs kept: the synthetic classes push their parents' rows and proxies apart, as
    # they do (and help) in the softmax losses; lam near 0 or 1, and near 0.5
    _ps_row("proxy_anchor", "real-only", "proxy_anchor", REAL_ONLY),
    _ps_row(
        "proxy_anchor",
        "real-only ps-alpha=2",
        "proxy_anchor",
        REAL_ONLY + ("--ps-alpha", "2"),
    ),
    # PS is a regulariser, and at the protocol's budget the baselines still improve: a
    # data-scarce regime, where a regulariser has more to correct, with as many steps:
    # a quarter of the training images (a random subset per seed, about 12 per class)
    # for 4x the epochs
    *_with_and_without_ps("proxy_anchor", "train=4000 epochs=32", SMALL_TRAIN_SET),
    _ps_row(
        "proxy_anchor",
        "train=4000 epochs=32 exclude-parents real-only",
        "proxy_anchor train=4000 epochs=32",
        SMALL_TRAIN_SET + NEGATIVES_ONLY,
    ),
    *_with_and_without_ps(
        "normalized_softmax", "train=4000 epochs=32", SMALL_TRAIN_SET
    ),
    # ... and an eighth of them (about 6 per class) for 8x the epochs
    *_with_and_without_ps("proxy_anchor", "train=2000 epochs=64", SMALLER_TRAIN_SET),
    _ps_row(
        "proxy_anchor",
        "train=2000 epochs=64 exclude-parents real-only",
        "proxy_anchor train=2000 epochs=64",
        SMALLER_TRAIN_SET + NEGATIVES_ONLY,
    ),
    # PS simulates unseen classes, which should matter more with fewer seen ones: a
    # CUB-sized task (100 training classes of about 50 images, 100 unseen test
    # classes), with about as many steps as the protocol
    *(
        row
        for loss in PROXY_LOSSES
        for row in _with_and_without_ps(loss, CUB_SIZED_TAG, CUB_SIZED)
    ),
    # ... and the variants that made PS level or better on the protocol: ProxyAnchor's
    # synthetic classes as negatives only, ArcFace's and CosFace's parents excluded
    # (CosFace's best also with lam ~ Beta(2, 2)), ProxyNCA at the official scale 12
    *(
        _ps_row(
            loss, f"{CUB_SIZED_TAG} {tag}", f"{loss} {CUB_SIZED_TAG}", CUB_SIZED + flags
        )
        for loss, tag, flags in (
            ("proxy_anchor", "exclude-parents real-only", NEGATIVES_ONLY),
            ("arcface", "exclude-parents", ("--ps-exclude-parents",)),
            ("cosface", "exclude-parents", ("--ps-exclude-parents",)),
            ("cosface", "exclude-parents ps-alpha=2", EXCLUDE_PARENTS_BETA_2),
        )
    ),
    *_with_and_without_ps(
        "proxy_nca", f"scale=12 {CUB_SIZED_TAG}", CUB_SIZED + NCA_SCALE_12
    ),
    # plain shuffling leaves most anchors of a 128-batch over 321 classes without a
    # positive; these margin rows get class-balanced batches (2 per class) instead:
    *_with_and_without_shared("m=2", M_PER_CLASS_2),
    # ... and trained 4x, 8x and 16x as long: a regulariser of the trunk may pay only
    # once the baseline has learned what the class loss alone can teach it
    *_with_and_without_shared("m=2 epochs=32", M_PER_CLASS_2 + EPOCHS_32),
    *_with_and_without_shared("m=2 epochs=64", M_PER_CLASS_2 + EPOCHS_64),
    *_with_and_without_shared("m=2 epochs=128", M_PER_CLASS_2 + EPOCHS_128),
    # the shared head with one of DiVA's other settings (algorithms.md B.4, B.9): the
    # adversarial decorrelation of the heads, a lower shared-loss weight, the
    # label-shuffle miner; and the paper's distance-weighted positive
    *(
        Row(
            f"margin+shared m=2 {tag}",
            "margin",
            False,
            True,
            "margin m=2",
            M_PER_CLASS_2 + flags,
        )
        for tag, flags in (
            ("rho=300", ("--decorrelation-rho", "300")),
            ("weight=0.1", ("--shared-weight", "0.1")),
            ("random", ("--shared-strategy", "random")),
            ("full", ("--shared-strategy", "full")),
        )
    ),
    # the shared head, alone and with PS over ProxyAnchor, on the CUB-sized task
    *_with_and_without_shared(f"m=2 {CUB_SIZED_TAG}", M_PER_CLASS_2 + CUB_SIZED),
    Row(
        f"proxy_anchor+ps+shared {CUB_SIZED_TAG}",
        "proxy_anchor",
        True,
        True,
        f"proxy_anchor {CUB_SIZED_TAG}",
        CUB_SIZED,
    ),
]

# The ProxyAnchor sweep (--sweep): the paper's alpha/mu grid around its defaults, with the
# official positive divisor ("all") and the undiluted one ("real").
SWEEP_ROWS: List[Row] = [Row("proxy_anchor", "proxy_anchor", False, False, "")]
for _mu, _alpha, _divisor in itertools.product(
    ("0.25", "0.5", "1"), ("0.4", "1", "2"), ("all", "real")
):
    SWEEP_ROWS.append(
        Row(
            f"proxy_anchor+ps mu={_mu} alpha={_alpha} divisor={_divisor}",
            "proxy_anchor",
            True,
            False,
            "proxy_anchor",
            ("--ps-mu", _mu, "--ps-alpha", _alpha, "--ps-positive-divisor", _divisor),
        )
    )

# The shared protocol (glyphs): sized for the 15 rows x 3 seeds of a full run in 60
# minutes on 2 CPU cores, as measured on one session's machine (about 12 s per epoch and
# 20 s of set-up and evaluation per run, with 2 single-thread jobs side by side); another
# machine of the same kind was 2.5x slower (results/glyphs-rerun.md). The supplementary
# rows come on top.
PROTOCOL = ["--epochs", "8", "--batch-size", "128", "--sampler", "random"]
# The sweep ran first, with 6 epochs (19 + 9 runs on one seed).
SWEEP_PROTOCOL = ["--epochs", "6"] + PROTOCOL[2:]
QUICK = [
    "--epochs",
    "1",
    "--max-train-images",
    "1500",
    "--max-test-images",
    "800",
]


def load_example():
    spec = importlib.util.spec_from_file_location("cub_proxyanchor", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# Proxy Synthesis rows run the paper's algorithm unless their own flags say otherwise:
# the example's defaults for ProxyAnchor changed after the committed rows were made
PAPER_PS = ("--no-ps-exclude-parents", "--no-ps-detach-parent-proxies")


def row_argv(row: Row, dataset: str, seed: int, extra: Sequence[str]) -> List[str]:
    argv = ["--dataset", dataset, "--loss", row.loss, "--seed", str(seed)]
    argv += list(PAPER_PS) if row.ps else ["--no-ps"]
    argv += ["--shared-head"] if row.shared_head else []
    return argv + list(extra) + list(row.flags)  # a row's own flags win


def claim_protocol(path: Path, protocol: str) -> None:
    """Records at ``path`` (beside the results CSV) the training flags its runs share,
    or checks them: finished runs are skipped only under the protocol they were made
    with, not reported under another one."""
    if not path.exists():
        path.write_text(protocol + "\n")
        return
    saved = path.read_text().strip()
    if saved != protocol:
        raise ValueError(
            f"{path.with_suffix('.csv')} holds runs made with `{saved}`, not "
            f"`{protocol}`: use another --results-dir"
        )


def read_done(path: Path) -> Dict[tuple, dict]:
    if not path.exists():
        return {}
    with path.open() as f:
        return {(r["method"], int(r["seed"])): r for r in csv.DictReader(f)}


@functools.cache
def example_module():
    """The example, loaded once per process."""
    return load_example()


def run_argv(
    row: Row, dataset: str, seed: int, extra: Sequence[str], output_dir: str
) -> List[str]:
    """The example's command line for one run of ``row``."""
    argv = row_argv(row, dataset, seed, extra)
    return argv + ["--output-dir", output_dir, "--no-plots", "--overwrite"]


def check_flags(row: Row, dataset: str, seed: int, extra: Sequence[str]) -> None:
    """Raises ValueError, with the example's message, if the example refuses the
    command line of this run (e.g. a misspelt flag after --)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            example_module().parse_args(run_argv(row, dataset, seed, extra, "unused"))
    except SystemExit as e:
        if e.code == 0:  # --help among the example flags: its help was printed
            raise
        message = stderr.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise ValueError(
            f"the example refuses the flags of row {row.method!r} seed {seed} "
            f"({' '.join(row_argv(row, dataset, seed, extra))}): {message}"
        ) from None


def run_one(row: Row, dataset: str, seed: int, extra: Sequence[str]) -> dict:
    """Trains and evaluates one row and seed with the example; returns its CSV record,
    with the records of its head weightings under "heads" (shared-head rows)."""
    example = example_module()
    with tempfile.TemporaryDirectory() as out:
        args = example.parse_args(run_argv(row, dataset, seed, extra, out))
        args.test_interval = args.epochs  # evaluate once, at the end
        start = time.perf_counter()
        results = example.run(args)
        seconds = time.perf_counter() - start
    last = results["last"]
    record = {
        "dataset": dataset,
        "method": row.method,
        "loss": row.loss,
        "ps": int(row.ps),
        "shared_head": int(row.shared_head),
        "seed": seed,
        "train_seconds": f"{seconds:.1f}",
    }
    record.update(percent(last))
    record["heads"] = [
        {"dataset": dataset, "method": row.method, "seed": seed, "weighting": name}
        | percent(scores)
        for name, scores in results.get("heads", {}).items()
    ]
    return record


def percent(metrics: Dict[str, float]) -> Dict[str, str]:
    """The example's metrics as CSV columns, in %."""
    return {column: f"{100 * metrics[name]:.3f}" for column, name in METRICS.items()}


def append_records(
    path: Path, records: Sequence[dict], columns: Sequence[str] = COLUMNS
) -> None:
    """Appends rows to a results CSV (its header first when the file is new)."""
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new_file:
            writer.writeheader()
        writer.writerows(records)


def replace_heads(path: Path, heads: Sequence[dict]) -> None:
    """Writes a run's head weightings to the heads CSV in place of any earlier ones of
    the same method and seed (a run redone: interrupted before its main record was
    written, or its main CSV removed)."""
    runs = {(h["method"], str(h["seed"])) for h in heads}
    kept = []
    if path.exists():
        with path.open() as f:
            kept = [
                r for r in csv.DictReader(f) if (r["method"], r["seed"]) not in runs
            ]
    new = path.with_suffix(".csv.new")
    new.unlink(missing_ok=True)
    append_records(new, kept + list(heads), HEAD_COLUMNS + list(METRICS))
    new.replace(path)


def mean_std(values: List[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def summarise(records: Dict[tuple, dict], rows: List[Row], title: str) -> str:
    by_method = {r.method: [] for r in rows}
    for (method, _), rec in records.items():
        by_method.setdefault(method, []).append(rec)
    columns = list(METRICS) + ["train_seconds"]
    lines = [
        f"# {title}",
        "",
        "Mean ± std over seeds (metrics in %). Δ MAP@R is the paired difference to the "
        "row's baseline (same seed), mean ± std over seeds. train_seconds is each run's "
        "wall time (data loading, training and the final test evaluation; shared-head "
        "rows run after commit ca13e9b also score the heads' other weightings, three "
        "more evaluations, about 17 s on glyphs) on the machine that ran it (two jobs "
        "side by side): rows run in different sessions may come from machines of "
        "different speed.",
        "",
        "| method | seeds | " + " | ".join(columns) + " | Δ MAP@R vs baseline |",
        "|" + "---|" * (len(columns) + 3),
    ]
    for row in rows:
        recs = by_method.get(row.method, [])
        cells = [mean_std([float(r[c]) for r in recs]) for c in columns]
        delta = "—"
        if row.baseline:
            base = {  # the baseline may not have been run (--methods)
                int(r["seed"]): float(r["map_at_r"])
                for r in by_method.get(row.baseline, [])
            }
            diffs = [
                float(r["map_at_r"]) - base[int(r["seed"])]
                for r in recs
                if int(r["seed"]) in base
            ]
            delta = f"{mean_std(diffs)} (vs {row.baseline})"
        lines.append(
            f"| {row.method} | {len(recs)} | " + " | ".join(cells) + f" | {delta} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: Dict[tuple, dict], rows: List[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if any(m == r.method for m, _ in records)]
    methods = [r.method for r in shown]
    colors = ["tab:blue" if r.baseline else "tab:gray" for r in shown]
    # one set of row labels (shared y axis), the first row on top
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(14, 1.5 + 0.22 * len(methods)))
    axes[0].invert_yaxis()
    for ax, column, label in zip(
        axes, ("map_at_r", "recall_at_1"), ("MAP@R (%)", "Recall@1 (%)")
    ):
        means, stds = [], []
        for method in methods:
            values = [
                float(rec[column]) for (m, _), rec in records.items() if m == method
            ]
            means.append(statistics.mean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.barh(methods, means, xerr=stds, capsize=3, color=colors)
        ax.set_xlabel(label + ", gray: baseline, blue: with the method")
        ax.set_xlim(min(means) - 3 * max(stds + [1]), max(means) + 3 * max(stds + [1]))
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] = None) -> int:
    example = example_module()  # its argument types, and its parser checks each run
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=example.HelpFormatter
    )
    parser.add_argument(
        "--dataset",
        default="glyphs",
        choices=("glyphs", "cub", "cars196", "sop"),
        help="the photo datasets need their data under --data-root",
    )
    parser.add_argument("--data-root", default="data", help="the datasets' folder")
    parser.add_argument(
        "--seeds",
        type=example.numpy_seed,
        nargs="+",
        default=[0, 1, 2],
        help="one run per row and seed",
    )
    parser.add_argument("--methods", nargs="+", help="only these rows (default: all)")
    parser.add_argument(
        "--results-dir",
        default=str(HERE / "results"),
        help="where the CSV, summary and chart go",
    )
    parser.add_argument(
        "--jobs",
        type=example.positive(int),
        default=2,
        help="runs in parallel, each with --num-threads torch threads",
    )
    parser.add_argument(
        "--num-threads",
        type=example.non_negative(int),
        default=1,
        help="torch threads per run, 0: torch's default",
    )
    parser.add_argument(
        "--supplementary",
        action="store_true",
        help="the supplementary rows (each changes one protocol flag) instead of the rows",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="the ProxyAnchor sweep of Proxy Synthesis settings instead of the rows",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run (<= 3 min)"
    )
    parser.add_argument(
        "extra", nargs="*", help="more example flags for every row (after --)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.sweep and args.supplementary:
        parser.error("--sweep and --supplementary exclude each other")
    all_rows = SWEEP_ROWS if args.sweep else ROWS + SUPPLEMENTARY_ROWS
    if args.methods:
        rows = [r for r in all_rows if r.method in args.methods]
    elif args.supplementary:
        rows = SUPPLEMENTARY_ROWS
    else:
        rows = SWEEP_ROWS if args.sweep else ROWS
    unknown = set(args.methods or ()) - {r.method for r in all_rows}
    if unknown:
        parser.error(
            f"unknown methods {sorted(unknown)}; choose from "
            f"{[r.method for r in all_rows]}"
        )
    if args.quick:  # the quick flags win over a row's own (e.g. its --epochs)
        rows = [r._replace(flags=r.flags + tuple(QUICK)) for r in rows]
    extra = ["--data-root", args.data_root, "--num-threads", str(args.num_threads)]
    training = SWEEP_PROTOCOL if args.sweep else PROTOCOL
    if args.dataset != "glyphs":
        training = []  # the example's defaults for photos (the Proxy-Anchor recipe)
    protocol = (QUICK if args.quick else training) + args.extra
    extra += protocol
    name = args.dataset + ("-proxy-anchor-sweep" if args.sweep else "")
    name += "-quick" if args.quick else ""
    results_dir = Path(args.results_dir)
    csv_path = results_dir / f"{name}.csv"
    done = read_done(csv_path)
    todo = [(r, s) for r in rows for s in args.seeds if (r.method, s) not in done]
    try:  # before anything is written: the protocol is claimed by valid flags only
        for r, s in todo:
            check_flags(r, args.dataset, s, extra)
        results_dir.mkdir(parents=True, exist_ok=True)
        claim_protocol(csv_path.with_suffix(".protocol"), " ".join(protocol))
    except ValueError as e:
        parser.error(str(e))
    print(f"{len(done)} runs done, {len(todo)} to go -> {csv_path}", flush=True)
    start, failed = time.perf_counter(), []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {
            pool.submit(run_one, r, args.dataset, s, extra): (r.method, s)
            for r, s in todo
        }
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            try:
                record = future.result()
            except Exception as e:  # the other runs go on, and their results are kept
                method, seed = futures[future]
                failed.append(f"{method} seed {seed}: {type(e).__name__}: {e}")
                print(f"[{i}/{len(todo)}] FAILED {failed[-1]}", flush=True)
                traceback.print_exception(e)
                continue
            heads = record.pop("heads", [])
            if heads:
                replace_heads(results_dir / f"{name}-heads.csv", heads)
            append_records(csv_path, [record])
            done[(record["method"], int(record["seed"]))] = record
            print(
                f"[{i}/{len(todo)}] {record['method']} seed {record['seed']}: MAP@R "
                f"{record['map_at_r']} R@1 {record['recall_at_1']} "
                f"({record['train_seconds']} s)",
                flush=True,
            )
    minutes = (time.perf_counter() - start) / 60
    print(f"{len(todo)} runs in {minutes:.1f} min with {args.jobs} jobs", flush=True)
    title = f"{args.dataset}: accuracy benchmark (`{' '.join(extra)}`)"
    # the summary covers every row with results, not only this invocation's
    done_methods = {method for method, _ in done}
    reported = [r for r in all_rows if r.method in done_methods]
    if reported:  # nothing to summarise when every run so far has failed
        (results_dir / f"{name}.md").write_text(summarise(done, reported, title))
        plot(done, reported, results_dir / f"{name}.png")
        print(f"wrote {results_dir / name}.{{csv,md,png}}")
    if failed:
        print(f"{len(failed)} run(s) failed:", *failed, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
