"""Cost of the package's parts against PML and reference implementations.

Three sections, chosen with ``--sections`` (default: all):

- ps: forward + backward of ``ProxySynthesisLoss`` against the bare PML loss (Norm-SoftMax
  and Proxy-Anchor) and, for Norm-SoftMax, against the official algorithm
  (navervision/proxy-synthesis, algorithms.md A.2: roll-by-one pairs, one lam,
  cross-entropy on scale * cosine; the official code caps mu at 1, here the roll is tiled,
  shift 1, 2, ..., so it makes the same M synthetic classes as the wrapper). Each ratio is
  printed beside the ideal size ratio (B+M)(C+M)/(B*C): the logit matrix grows from B x C
  to (B+M) x (C+M). Peak memory is measured on CUDA only (``max_memory_allocated``); on
  CPU the section reports time only. Targets: wrapper/bare within 1.15x of the ideal
  ratio for C >= 1000, and the wrapper never slower than the official function.
- miner: ``SharedCharacteristicsMiner`` (standard and full) against PML's
  ``DistanceWeightedMiner``, PML's ``TripletMarginMiner`` and two per-anchor loops: the
  authors' structure (DiVA ``batchminer/diva_shared_distance_{an,apn}.py``: per anchor the
  weights from its distance row in torch, then one ``np.random.choice`` for the negative
  and one for the positive) and a stricter, half-vectorised one (the log-weights of the
  whole batch as one matrix first). Targets: no slower than DistanceWeightedMiner, and
  >= 20x faster than the loop at B=256 (reported against both loops).
- train-step: one optimizer step (zero_grad, forward of trunk + embedder + loss, backward,
  step) of the example's glyphs model (``examples/cub_proxyanchor.py``: small conv trunk,
  32x32 grayscale, 128-d, batch 128) on random inputs: Proxy-Anchor without Proxy
  Synthesis (the baseline), with it, and with it plus the shared head (the loss split as
  PML's ``CascadedEmbeddings`` trainer does).

Timing: within a section's cell all candidates are timed interleaved (round robin, one
call of each per round) after warm-up, so load changes hit them alike; the figure is the
median per call. Repeats are adaptive: at most ``--repeats``, fewer (but >= 3) when a
candidate's calls would exceed ``--budget`` seconds. The ratios measured side by side are
the headline; absolute times hold only for the machine and load named in the header.
Torch uses ``--threads`` CPU threads, and ``OMP_WAIT_POLICY`` defaults to PASSIVE as in
the example (spinning OpenMP threads make multi-threaded calls many times slower on a
busy CPU); set it in the environment to override.

    python benchmarks/cost.py                                  # all, CUDA if available
    python benchmarks/cost.py --device cpu --sections miner train-step
    python benchmarks/cost.py --quick --out /tmp/cost.md       # smoke test, < 1 minute

The report (printed, and written to ``benchmarks/results/cost-<device>.md`` or ``--out``)
has a header (machine, versions, threads, date, load average) and one table per section
with its targets marked met or MISSED. With ``--quick`` only ``--out`` is written (nothing
without it), so a smoke run never replaces the results.
"""

import os

# Idle OpenMP threads sleep instead of spinning (as in the example, whose training step
# is measured here): spinning threads distort timings on a busy CPU. Set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pytorch_metric_learning
import torch
import torch.nn.functional as F
from accuracy import example_module  # benchmarks/accuracy.py, beside this script
from pytorch_metric_learning import losses
from pytorch_metric_learning.miners import DistanceWeightedMiner, TripletMarginMiner

from pml_proxysynth.losses import ProxySynthesisLoss
from pml_proxysynth.miners import SharedCharacteristicsMiner

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("ps", "miner", "train-step")
DEFAULT_REPEATS = {"ps": 15, "miner": 50, "train-step": 20}
MIN_REPEATS = 3
GLYPHS_CLASSES = 321  # training classes of the example's default glyphs set

# ------------------------------------------------------------------------- shared


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_name(device: torch.device) -> str:
    """The CUDA device name (with the host CPU), or the CPU model."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (host CPU: {cpu_model()})"
    return cpu_model()


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or "n/a"."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def sync(device: torch.device) -> None:
    """Waits for queued CUDA work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class Timing(NamedTuple):
    """Median seconds per call and the number of timed calls behind it."""

    median: float
    repeats: int


class TimingConfig(NamedTuple):
    """How many warm-up and timed calls each candidate gets."""

    repeats: int
    warmup: int
    budget: float


def time_round_robin(
    fns: Dict[str, Callable[[], object]], device: torch.device, config: TimingConfig
) -> Dict[str, Timing]:
    """Times ``fns`` interleaved, one call of each per round, after warm-up.

    Each candidate gets ``config.repeats`` calls, or fewer (at least ``MIN_REPEATS``) when
    its last warm-up call says they would take more than ``config.budget`` seconds; a
    candidate whose warm-up calls alone exceed the budget stops warming up early.
    """
    counts = {}
    for name, fn in fns.items():
        seconds = 0.0
        for _ in range(config.warmup):
            seconds = time_call(fn, device)
            if seconds * config.warmup > config.budget:
                break
        fit = int(config.budget / max(seconds, 1e-9))
        counts[name] = max(MIN_REPEATS, min(config.repeats, fit))
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(max(counts.values())):
        for name, fn in fns.items():
            if r < counts[name]:
                times[name].append(time_call(fn, device))
    return {name: Timing(statistics.median(t), len(t)) for name, t in times.items()}


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> List[str]:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def verdict(failures: List[str]) -> str:
    """Returns "met", or "MISSED (...)" listing the failing cases."""
    return "met" if not failures else "MISSED (" + "; ".join(failures) + ")"


def ms(seconds: float) -> str:
    """Seconds as milliseconds with 3 decimals."""
    return f"{seconds * 1e3:.3f}"


# ------------------------------------------------------------------------- ps


def official_norm_softmax_ps(
    emb: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lam: torch.Tensor,
    mu: float,
    scale: float,
) -> torch.Tensor:
    """Official Proxy Synthesis + Norm-SoftMax, generalised to mu > 1 by tiling the roll."""
    batch_size, num_classes = emb.shape[0], weight.shape[0]
    x, p = F.normalize(emb, dim=1), F.normalize(weight, dim=1)
    m = int(math.floor(mu * batch_size + 0.5))
    rounds = math.ceil(m / batch_size)
    px = p[labels]
    x_syn = torch.cat(
        [lam * x + (1 - lam) * x.roll(s, 0) for s in range(1, rounds + 1)]
    )
    p_syn = torch.cat(
        [lam * px + (1 - lam) * px.roll(s, 0) for s in range(1, rounds + 1)]
    )
    all_x = F.normalize(torch.cat([x, x_syn[:m]]), dim=1)
    all_p = F.normalize(torch.cat([p, p_syn[:m]]), dim=1)
    syn_labels = torch.arange(num_classes, num_classes + m, device=emb.device)
    all_y = torch.cat([labels, syn_labels])
    return F.cross_entropy(scale * all_x @ all_p.t(), all_y)


def fwd_bwd(
    loss_fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]
) -> Callable[[], None]:
    """A call that clears the leaves' gradients (as zero_grad does), then runs
    forward and backward."""

    def run() -> None:
        for t in leaves:
            t.grad = None
        loss_fn().backward()

    return run


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """CUDA memory allocated at the peak of one call of ``fn`` beyond what was before."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def ps_cell(
    loss_name: str,
    batch_size: int,
    num_classes: int,
    mu: float,
    dim: int,
    device: torch.device,
    config: TimingConfig,
) -> Tuple[Dict[str, Timing], Dict[str, float]]:
    """Times (and on CUDA, peak memory) of bare, wrapper and (Norm-SoftMax) official."""
    torch.manual_seed(0)
    scale = 23.0
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    # the official roll pairs row i with row i-1, which must be of another class
    labels = torch.where(labels == labels.roll(1), (labels + 1) % num_classes, labels)
    emb = torch.randn(batch_size, dim, device=device, requires_grad=True)
    if loss_name == "NormalizedSoftmaxLoss":
        inner = losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=1 / scale)
    else:
        inner = losses.ProxyAnchorLoss(num_classes, dim)
    inner.to(device)
    wrapper = ProxySynthesisLoss(inner, mu=mu)
    leaves = [emb, *inner.parameters()]
    candidates = {
        "bare": fwd_bwd(lambda: inner(emb, labels), leaves),
        "wrapper": fwd_bwd(lambda: wrapper(emb, labels), leaves),
    }
    if loss_name == "NormalizedSoftmaxLoss":
        lam = torch.tensor(0.3, device=device)
        candidates["official"] = fwd_bwd(
            lambda: official_norm_softmax_ps(emb, inner.W.t(), labels, lam, mu, scale),
            leaves,
        )
    timings = time_round_robin(candidates, device, config)
    memory = {}
    if device.type == "cuda":
        memory = {name: peak_memory_mib(fn, device) for name, fn in candidates.items()}
    return timings, memory


def run_ps(device: torch.device, config: TimingConfig, quick: bool) -> List[str]:
    """The ps section: its markdown lines."""
    dim = 512
    batch_sizes, class_counts, mus = (64, 180), (100, 1000, 11318), (0.5, 1.0, 2.0)
    if quick:
        batch_sizes, class_counts, mus = (64,), (100, 1000), (1.0,)
    header = [
        "loss", "B", "C", "mu", "M", "bare ms", "wrapper ms", "official ms",
        "wrapper/bare", "ideal", "(wrapper/bare)/ideal", "wrapper/official",
        "peak MiB bare", "peak MiB wrapper", "peak MiB official", "repeats",
    ]  # fmt: skip
    print(" | ".join(header), flush=True)
    rows, ideal_misses, official_misses = [], [], []
    for loss_name in ("NormalizedSoftmaxLoss", "ProxyAnchorLoss"):
        for batch_size in batch_sizes:
            for num_classes in class_counts:
                for mu in mus:
                    t, mem = ps_cell(
                        loss_name, batch_size, num_classes, mu, dim, device, config
                    )
                    m = int(math.floor(mu * batch_size + 0.5))
                    ideal = (batch_size + m) * (num_classes + m)
                    ideal /= batch_size * num_classes
                    ratio = t["wrapper"].median / t["bare"].median
                    official = t.get("official")
                    vs_official = (
                        None
                        if official is None
                        else t["wrapper"].median / official.median
                    )
                    case = f"{loss_name} B={batch_size} C={num_classes} mu={mu}"
                    if num_classes >= 1000 and ratio / ideal > 1.15:
                        ideal_misses.append(f"{case}: {ratio / ideal:.2f}")
                    if vs_official is not None and vs_official > 1:
                        official_misses.append(f"{case}: {vs_official:.2f}")
                    row = [
                        loss_name, batch_size, num_classes, mu, m,
                        ms(t["bare"].median), ms(t["wrapper"].median),
                        "n/a" if official is None else ms(official.median),
                        f"{ratio:.2f}", f"{ideal:.2f}", f"{ratio / ideal:.2f}",
                        "n/a" if vs_official is None else f"{vs_official:.2f}",
                        *(
                            f"{mem[k]:.1f}" if k in mem else "n/a"
                            for k in ("bare", "wrapper", "official")
                        ),
                        "/".join(str(x.repeats) for x in t.values()),
                    ]  # fmt: skip
                    rows.append(row)
                    print(" | ".join(str(c) for c in row), flush=True)
    memory_note = (
        "peak MiB: `torch.cuda.max_memory_allocated` during one forward + backward, "
        "beyond what was allocated before (inputs and proxies)"
        if device.type == "cuda"
        else "peak memory: n/a on CPU (not measured; this section times only)"
    )
    return [
        "## ps: ProxySynthesisLoss forward + backward",
        "",
        f"- D = {dim}; ProxySynthesisLoss(inner, mu=mu) with its defaults (random "
        "pairing, one lam per batch, positive_divisor='all'); NormalizedSoftmaxLoss "
        "with temperature 1/23; ProxyAnchorLoss with its defaults",
        "- official: the official algorithm (Norm-SoftMax only), roll pairing tiled for "
        "mu > 1, fixed lam 0.3; n/a for ProxyAnchorLoss",
        "- ideal: (B+M)(C+M)/(B*C), the growth of the logit matrix",
        f"- {memory_note}",
        "- repeats: timed calls of bare/wrapper[/official]",
        "",
        *table(header, rows),
        "",
        "Targets:",
        "",
        "- wrapper/bare within 1.15x of the ideal ratio for C >= 1000: "
        + verdict(ideal_misses),
        "- wrapper never slower than the official-algorithm function: "
        + verdict(official_misses),
    ]


# ------------------------------------------------------------------------- miner


def loop_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    full: bool,
    per_anchor_weights: bool,
    cutoff: float = 0.5,
) -> Tuple[List[int], List[int], List[int]]:
    """A per-anchor sampling loop: the negative, then the positive, one
    ``np.random.choice`` each.

    ``per_anchor_weights=True`` is the authors' structure (DiVA
    ``batchminer/diva_shared_distance_{an,apn}.py``): the distance matrix once, then per
    anchor the weights from the anchor's distance row, computed in torch, normalised and
    moved to numpy (twice per anchor for "full"). ``False`` is a stricter, half-vectorised
    reference: the log-weights of the whole batch as one numpy matrix, so that only the
    masking and the draws run per anchor.
    """
    x = F.normalize(embeddings.detach(), dim=1)
    dist = torch.cdist(x, x).clamp(min=cutoff)
    labels = labels.cpu().numpy()
    bs, d = x.shape

    def log_density(dist):  # the log inverse density of unit-sphere distances
        return (2.0 - d) * dist.log() - ((d - 3) / 2.0) * (1.0 - 0.25 * dist**2).clip(
            1e-8
        ).log()

    if per_anchor_weights:

        def probabilities(i: int, allowed: np.ndarray) -> np.ndarray:
            log_w = log_density(dist[i])
            allowed = torch.from_numpy(allowed).to(log_w.device)
            log_w = log_w.masked_fill(~allowed, -math.inf)
            w = torch.exp(log_w - log_w.max())
            return (w / w.sum()).cpu().numpy()

    else:
        log_w_matrix = log_density(dist.cpu().double()).numpy()

        def probabilities(i: int, allowed: np.ndarray) -> np.ndarray:
            w = np.exp(log_w_matrix[i] - np.max(log_w_matrix[i][allowed])) * allowed
            return w / w.sum()

    anchors, positives, negatives = [], [], []
    for i in range(bs):
        neg = labels != labels[i]
        if len(np.unique(labels[neg])) < 2:
            continue
        n = np.random.choice(bs, p=probabilities(i, neg))
        pos = neg & (labels != labels[n])
        if full:
            p = np.random.choice(bs, p=probabilities(i, pos))
        else:
            p = np.random.choice(np.flatnonzero(pos))
        anchors.append(i)
        positives.append(p)
        negatives.append(n)
    return anchors, positives, negatives


def balanced_batch(
    batch_size: int, dim: int, per_class: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random unit embeddings, ``per_class`` rows per class."""
    labels = torch.arange(batch_size // per_class).repeat_interleave(per_class)
    embeddings = F.normalize(torch.randn(batch_size, dim), dim=1)
    return embeddings.to(device), labels.to(device)


def run_miner(
    device: torch.device,
    config: TimingConfig,
    quick: bool,
    per_class: int,
    triplet_type: str,
) -> List[str]:
    """The miner section: its markdown lines."""
    batch_sizes, dims = (
        ((112, 256), (128,)) if quick else ((112, 256, 1024), (128, 512))
    )
    tmm = f"TMM-{triplet_type}"
    miners = {
        "standard": SharedCharacteristicsMiner(strategy="standard"),
        "full": SharedCharacteristicsMiner(strategy="full"),
        "DWM": DistanceWeightedMiner(),
        tmm: TripletMarginMiner(type_of_triplets=triplet_type),
    }
    loops = {  # name -> (strategy, full, per_anchor_weights)
        "loop-std": ("standard", False, True),
        "loop-full": ("full", True, True),
        "matrix-loop-std": ("standard", False, False),
        "matrix-loop-full": ("full", True, False),
    }
    names = [*miners, *loops]
    time_rows, ratio_rows, dwm_misses = [], [], []
    loop_misses = {"loop": [], "matrix-loop": []}
    for batch_size in batch_sizes:
        for dim in dims:
            emb, labels = balanced_batch(batch_size, dim, per_class, device)
            fns = {name: partial(miner, emb, labels) for name, miner in miners.items()}
            for name, (_, full, per_anchor) in loops.items():
                fns[name] = partial(loop_reference, emb, labels, full, per_anchor)
            timings = time_round_robin(fns, device, config)
            t = {k: v.median for k, v in timings.items()}
            repeats = "/".join(str(timings[k].repeats) for k in names)
            time_rows.append([batch_size, dim, *(ms(t[k]) for k in names), repeats])
            r = {
                "DWM / standard": t["DWM"] / t["standard"],
                "DWM / full": t["DWM"] / t["full"],
                f"{tmm} / standard": t[tmm] / t["standard"],
            }
            for name, (strategy, _, _) in loops.items():
                r[f"{name} / {strategy}"] = t[name] / t[strategy]
            ratio_rows.append([batch_size, dim, *(f"{x:.1f}x" for x in r.values())])
            print(
                f"B={batch_size:5d} D={dim:4d}  "
                + "  ".join(f"{k} {ms(t[k])} ms" for k in names),
                flush=True,
            )
            case = f"B={batch_size} D={dim}"
            if min(r["DWM / standard"], r["DWM / full"]) < 1:
                dwm_misses.append(
                    f"{case}: {r['DWM / standard']:.2f}x / {r['DWM / full']:.2f}x"
                )
            for loop, misses in loop_misses.items():
                std, full = r[f"{loop}-std / standard"], r[f"{loop}-full / full"]
                if batch_size == 256 and min(std, full) < 20:
                    misses.append(f"{case}: {std:.1f}x / {full:.1f}x")
    return [
        "## miner: SharedCharacteristicsMiner",
        "",
        f"- batch: class-balanced, {per_class} per class; embeddings random unit "
        "vectors; distance cutoff 0.5",
        "- standard/full: SharedCharacteristicsMiner(strategy=...); DWM: PML "
        "DistanceWeightedMiner() (|class| triplets per anchor, upper cutoff 1.4); "
        f"{tmm}: PML TripletMarginMiner(type_of_triplets={triplet_type!r}) (builds all "
        "B^3 triplets, then filters)",
        "- loop-std/loop-full: the per-anchor loop in the authors' structure (DiVA "
        "`diva_shared_distance_an/apn`): the distance matrix once, then per anchor the "
        "weights from its distance row in torch and one np.random.choice for the "
        "negative and one for the positive (full: the weights computed again for the "
        "positive)",
        "- matrix-loop-std/matrix-loop-full: a stricter, half-vectorised loop: the "
        "log-weights of the whole batch as one numpy matrix, per anchor only the "
        "masking and the two draws",
        "",
        "Times (ms per call):",
        "",
        *table(["B", "D", *names, "repeats"], time_rows),
        "",
        "Ratios (higher: the miner is faster):",
        "",
        *table(["B", "D", *r], ratio_rows),
        "",
        "Targets:",
        "",
        "- no slower than DistanceWeightedMiner (both strategies): "
        + verdict(dwm_misses),
        "- >= 20x faster than the loop at B = 256 (both strategies), against the "
        "authors' per-anchor loop: " + verdict(loop_misses["loop"]),
        "- the same against the half-vectorised matrix loop: "
        + verdict(loop_misses["matrix-loop"]),
    ]


# ------------------------------------------------------------------------- train-step

TRAIN_CONFIGS = {  # name -> the example's flags after --dataset glyphs
    "baseline": ["--no-ps"],
    "PS": [],
    "PS + shared head": ["--shared-head"],
}


def training_step(
    ex, flags: Sequence[str], x: torch.Tensor, labels: torch.Tensor, seed: int
) -> Callable[[], None]:
    """One optimizer step of the example's model and loss, as PML's trainers take it:
    zero_grad, embeddings = embedder(trunk(x)), weighted losses, backward, step."""
    args = ex.parse_args(["--dataset", "glyphs", "--device", str(x.device), *flags])
    torch.manual_seed(seed)  # the same initial trunk for every configuration
    models = ex.build_model(args)
    setup = ex.build_loss(args, GLYPHS_CLASSES)
    optimizers, _ = ex.build_optimizers(args, models, setup.loss_funcs)
    for module in [*models.values(), *setup.loss_funcs.values()]:
        module.train()  # ProxySynthesisLoss synthesises in training mode only
    trunk, embedder = models["trunk"], models["embedder"]

    def total_loss(embeddings: torch.Tensor) -> torch.Tensor:
        if not args.shared_head:  # MetricLossOnly
            loss = setup.loss_funcs["metric_loss"](embeddings, labels)
            return setup.loss_weights["metric_loss"] * loss
        # CascadedEmbeddings: slice i of the embeddings goes to tuple_miner_i (if any),
        # then to metric_loss_i with the mined tuples
        total, start = 0.0, 0
        for i, size in enumerate(embedder.embedding_sizes):
            part = embeddings[:, start : start + size]
            miner = setup.mining_funcs.get(f"tuple_miner_{i}")
            indices_tuple = None if miner is None else miner(part, labels)
            loss = setup.loss_funcs[f"metric_loss_{i}"](part, labels, indices_tuple)
            total = total + setup.loss_weights[f"metric_loss_{i}"] * loss
            start += size
        return total

    def step() -> None:
        for opt in optimizers.values():
            opt.zero_grad()
        total_loss(embedder(trunk(x))).backward()
        for opt in optimizers.values():
            opt.step()

    return step


def run_train_step(device: torch.device, config: TimingConfig, seed: int) -> List[str]:
    """The train-step section: its markdown lines."""
    ex = example_module()
    torch.manual_seed(seed)
    batch = 128
    x = torch.randn(batch, 1, 32, 32, device=device)
    labels = torch.randint(0, GLYPHS_CLASSES, (batch,), device=device)
    steps = {
        name: training_step(ex, flags, x, labels, seed)
        for name, flags in TRAIN_CONFIGS.items()
    }
    t = time_round_robin(steps, device, config)
    base, ps = t["baseline"].median, t["PS"].median
    defaults = ex.parse_args(["--dataset", "glyphs", "--device", str(device)])
    rows = []
    for name, flags in TRAIN_CONFIGS.items():
        row = [
            name,
            " ".join(["--dataset glyphs", *flags]),
            ms(t[name].median),
            f"{t[name].median / base:.2f}",
            f"{t[name].median / ps:.2f}" if name != "baseline" else "n/a",
            t[name].repeats,
        ]
        rows.append(row)
        print(" | ".join(str(c) for c in row), flush=True)
    return [
        "## train-step: one optimizer step of the example's glyphs model",
        "",
        f"- examples/cub_proxyanchor.py building blocks (build_model, build_loss, "
        f"build_optimizers): small_conv trunk, 128-d, proxy_anchor over "
        f"{GLYPHS_CLASSES} classes, AdamW; random inputs [{batch}, 1, 32, 32] and "
        "random labels",
        f"- PS: the example's defaults (alpha {defaults.ps_alpha}, "
        f"mu {defaults.ps_mu}, {defaults.ps_pairing} pairing, one lam per "
        f"{defaults.ps_lam_per}, positive divisor {defaults.ps_positive_divisor!r}, "
        f"parents excluded {defaults.ps_exclude_parents}, parent proxies detached "
        f"{defaults.ps_detach_parent_proxies}); "
        f"shared head: {defaults.shared_size}-d, MarginLoss on "
        f"SharedCharacteristicsMiner({defaults.shared_strategy!r}) triplets, "
        f"weight {defaults.shared_weight}",
        "- a step: zero_grad, embedder(trunk(x)), the loss (shared head: slice 0 to "
        "metric_loss_0, slice 1 to tuple_miner_1 then metric_loss_1, weighted sum, as "
        "CascadedEmbeddings), backward, every optimizer's step",
        "",
        *table(
            ["config", "example flags", "ms/step", "/ baseline", "/ PS", "repeats"],
            rows,
        ),
    ]


# ------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    ex = example_module()  # its argument types
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=ex.HelpFormatter,
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="the sections to run (always in the order ps, miner, train-step)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda when available, else cpu",
    )
    p.add_argument(
        "--threads", type=ex.positive(int), default=2, help="torch CPU threads"
    )
    p.add_argument(
        "--repeats",
        type=ex.positive(int),
        help="timed calls per candidate at most; unset: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items()),
    )
    p.add_argument(
        "--warmup",
        type=ex.non_negative(int),
        default=3,
        help="warm-up calls per candidate",
    )
    p.add_argument(
        "--budget",
        type=ex.positive(float),
        default=3.0,
        help="seconds of timed calls per candidate and cell; slower candidates get "
        f"fewer repeats (at least {MIN_REPEATS})",
    )
    p.add_argument("--per-class", type=int, default=2, choices=(2, 4),
                   help="miner: rows per class in the batch")  # fmt: skip
    p.add_argument("--triplet-type", choices=("semihard", "all"), default="semihard",
                   help="miner: TripletMarginMiner's type_of_triplets")  # fmt: skip
    p.add_argument("--seed", type=ex.numpy_seed, default=0, help="torch and numpy seed")
    p.add_argument("--out", type=Path, help="markdown report to write")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny grid and few repeats (smoke test); writes only --out",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs the chosen sections, prints the report and writes it."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    load_start = load_average()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    def timing(section: str) -> TimingConfig:
        repeats = args.repeats or DEFAULT_REPEATS[section]
        if args.quick:
            return TimingConfig(min(repeats, 5), 1, min(args.budget, 0.3))
        return TimingConfig(repeats, args.warmup, args.budget)

    body: List[str] = []
    for section in SECTIONS:
        if section not in args.sections:
            continue
        print(f"\n== {section}", flush=True)
        if section == "ps":
            lines = run_ps(device, timing(section), args.quick)
        elif section == "miner":
            lines = run_miner(
                device, timing(section), args.quick, args.per_class, args.triplet_type
            )
        else:
            lines = run_train_step(device, timing(section), args.seed)
        body += ["", *lines]

    command = " ".join(["python benchmarks/cost.py", *(argv or sys.argv[1:])])
    header = [
        f"# Cost benchmarks on {device.type}" + (" (--quick)" if args.quick else ""),
        "",
        f"- machine: {machine_name(device)}",
        f"- torch {torch.__version__}, pytorch-metric-learning "
        f"{pytorch_metric_learning.__version__}, numpy {np.__version__}, Python "
        f"{platform.python_version()}; torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"- date: {started}; load average (1, 5, 15 min) at start / end: "
        f"{load_start} / {load_average()} (absolute times move with the load; the "
        "ratios, measured side by side, are the headline)",
        "- timing: candidates interleaved (one call of each per round) after warm-up, "
        "median per call; repeats adaptive (at most the section's maximum, fewer but "
        f">= {MIN_REPEATS} for slow candidates)",
        f"- produced by `{command}`",
    ]
    text = "\n".join(header + body) + "\n"
    print("\n" + text)
    out = args.out
    if out is None and not args.quick:
        out = RESULTS / f"cost-{device.type}.md"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
