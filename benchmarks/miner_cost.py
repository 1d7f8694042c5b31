"""Cost of SharedCharacteristicsMiner against PML's DistanceWeightedMiner and a loop.

The loop reference is the authors' style (DiVA ``batchminer/shared_*_distance.py``): the
distance-weight matrix is computed once, then a Python loop over anchors draws the negative
with one ``np.random.choice`` and the positive with another. All methods are timed
round-robin (one call of each per round), so load changes on a shared machine hit them
alike; the figure is the median per-call time after warm-up.

    python benchmarks/miner_cost.py                  # CPU, 2 threads
    python benchmarks/miner_cost.py --device cuda    # also writes miner-cost-cuda.md

Targets: the miner no slower than DistanceWeightedMiner, and >= 20x faster than the loop
at B=256.
"""

import argparse
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytorch_metric_learning
import torch
import torch.nn.functional as F
from pytorch_metric_learning.miners import DistanceWeightedMiner

from pml_proxysynth.miners import SharedCharacteristicsMiner

BATCH_SIZES = (112, 256, 1024)
DIMS = (128, 512)
RESULTS = Path(__file__).resolve().parent / "results"


def loop_reference(
    embeddings: torch.Tensor, labels: torch.Tensor, full: bool, cutoff: float = 0.5
) -> Tuple[List[int], List[int], List[int]]:
    """Per-anchor loop in the authors' style: weights as a matrix, sampling per anchor."""
    x = F.normalize(embeddings.detach(), dim=1)
    dist = torch.cdist(x, x).clamp(min=cutoff).cpu().numpy().astype(np.float64)
    labels = labels.cpu().numpy()
    bs, d = x.shape
    log_w = (2.0 - d) * np.log(dist) - ((d - 3) / 2.0) * np.log(
        np.clip(1.0 - 0.25 * dist**2, 1e-8, None)
    )
    anchors, positives, negatives = [], [], []
    for i in range(bs):
        neg = labels != labels[i]
        if len(np.unique(labels[neg])) < 2:
            continue
        w = np.exp(log_w[i] - np.max(log_w[i][neg])) * neg
        n = np.random.choice(bs, p=w / w.sum())
        pos = neg & (labels != labels[n])
        if full:
            pw = np.exp(log_w[i] - np.max(log_w[i][pos])) * pos
            p = np.random.choice(bs, p=pw / pw.sum())
        else:
            p = np.random.choice(np.where(pos)[0])
        anchors.append(i)
        positives.append(p)
        negatives.append(n)
    return anchors, positives, negatives


def balanced_batch(
    batch_size: int, dim: int, per_class: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(batch_size // per_class).repeat_interleave(per_class)
    embeddings = F.normalize(torch.randn(batch_size, dim), dim=1)
    return embeddings.to(device), labels.to(device)


def time_round_robin(
    fns: Dict[str, Callable[[], object]],
    repeats: Dict[str, int],
    warmup: int,
    device: torch.device,
) -> Dict[str, float]:
    """Median seconds per call of each fn; one call of each per round."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for name, fn in fns.items():
        for _ in range(warmup if repeats[name] > 3 else 1):
            fn()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(max(repeats.values())):
        for name, fn in fns.items():
            if r >= repeats[name]:
                continue
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=2, choices=(2, 4))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--dwm-slow-repeats",
        type=int,
        default=3,
        help="repeats of DistanceWeightedMiner at B=1024 (seconds per call on CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="markdown file to write")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device) + f" (host CPU: {cpu_model()})"
    else:
        machine = cpu_model()
    load_before = load_average()

    standard = SharedCharacteristicsMiner(strategy="standard")
    full = SharedCharacteristicsMiner(strategy="full")
    dwm = DistanceWeightedMiner()
    rows = []
    for batch_size in BATCH_SIZES:
        for dim in DIMS:
            emb, labels = balanced_batch(batch_size, dim, args.per_class, device)
            fns = {
                "standard": partial(standard, emb, labels),
                "full": partial(full, emb, labels),
                "DWM": partial(dwm, emb, labels),
                "loop-std": partial(loop_reference, emb, labels, full=False),
                "loop-full": partial(loop_reference, emb, labels, full=True),
            }
            repeats = {name: args.repeats for name in fns}
            if batch_size >= 1024:
                repeats["loop-std"] = repeats["loop-full"] = max(5, args.repeats // 5)
                if device.type == "cpu":
                    repeats["DWM"] = args.dwm_slow_repeats
            med = time_round_robin(fns, repeats, args.warmup, device)
            rows.append((batch_size, dim, med, repeats))
            print(
                f"B={batch_size:5d} D={dim:4d}  "
                + "  ".join(f"{k} {v * 1e3:9.3f} ms" for k, v in med.items()),
                flush=True,
            )
    load_after = load_average()

    lines = [
        f"# Miner cost on {device.type}",
        "",
        f"- machine: {machine}; torch.get_num_threads() = {torch.get_num_threads()}",
        f"- torch {torch.__version__}, pytorch-metric-learning "
        f"{pytorch_metric_learning.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}",
        f"- batch: class-balanced, {args.per_class} per class; embeddings random "
        "unit vectors; distance cutoff 0.5",
        f"- median per call after warm-up, methods timed round-robin in one run; "
        f"{args.repeats} repeats (loops at B=1024: {max(5, args.repeats // 5)}; "
        + (
            f"DistanceWeightedMiner at B=1024: {args.dwm_slow_repeats}, "
            "it takes seconds per call)"
            if device.type == "cpu"
            else "DistanceWeightedMiner: all)"
        ),
        f"- load average (1, 5, 15 min) before / after: {load_before} / {load_after} "
        "(the machine is shared; figures move with the load)",
        "- standard/full: SharedCharacteristicsMiner(strategy=...); DWM: PML "
        "DistanceWeightedMiner() (returns |class| triplets per anchor, upper cutoff "
        "1.4); loop-std/loop-full: per-anchor numpy loop, one np.random.choice for "
        "the negative and one for the positive",
        "",
        "## Times (ms per call)",
        "",
        "| B | D | standard | full | DWM | loop-std | loop-full |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch_size, dim, med, _ in rows:
        lines.append(
            f"| {batch_size} | {dim} | "
            + " | ".join(
                f"{med[k] * 1e3:.3f}"
                for k in ("standard", "full", "DWM", "loop-std", "loop-full")
            )
            + " |"
        )
    lines += [
        "",
        "## Ratios (higher = the miner is faster)",
        "",
        "| B | D | DWM / standard | DWM / full | loop-std / standard "
        "| loop-full / full |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for batch_size, dim, med, _ in rows:
        r = (
            med["DWM"] / med["standard"],
            med["DWM"] / med["full"],
            med["loop-std"] / med["standard"],
            med["loop-full"] / med["full"],
        )
        lines.append(
            f"| {batch_size} | {dim} | " + " | ".join(f"{x:.1f}x" for x in r) + " |"
        )
        if min(r[0], r[1]) < 1:
            verdicts.append(
                f"slower than DistanceWeightedMiner at B={batch_size}, D={dim}"
            )
        if batch_size == 256 and min(r[2], r[3]) < 20:
            verdicts.append(f"less than 20x faster than the loop at B=256, D={dim}")
    lines += [
        "",
        "## Targets",
        "",
        "- no slower than DistanceWeightedMiner (ratio >= 1x): "
        + ("met" if not any("DistanceWeighted" in v for v in verdicts) else "MISSED"),
        "- >= 20x faster than the loop at B=256: "
        + ("met" if not any("loop" in v for v in verdicts) else "MISSED"),
    ]
    lines += [f"  - {v}" for v in verdicts]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    out = Path(args.out) if args.out else RESULTS / f"miner-cost-{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
