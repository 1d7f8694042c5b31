"""Forward+backward cost of ProxySynthesisLoss against the bare loss and the official algorithm.

For each (loss, B, C, mu) the three candidates are timed interleaved in one run, and each
ratio is printed beside the ideal size ratio (B+M)(C+M)/(B*C): the logit matrix grows from
B x C to (B+M) x (C+M). Targets (issue 2): wrapper/bare within 1.15x of the ideal ratio for
C >= 1000, and the wrapper never slower than the official-algorithm function.

The official-algorithm function follows navervision/proxy-synthesis (algorithms.md A.2):
roll-by-one pairs, one lam, cross-entropy on scale * cosine (Norm-SoftMax). The official
code caps mu at 1; here it tiles the roll (shift 1, 2, ...) for mu > 1, so it makes the
same M synthetic classes as the wrapper.

    python benchmarks/ps_cost.py [--device cuda] [--quick]
"""

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses

from pml_proxysynth.losses import ProxySynthesisLoss

RESULTS = Path(__file__).parent / "results"


def official_norm_softmax_ps(emb, weight, labels, lam, mu, scale):
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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def fwd_bwd(loss_fn, emb):
    def run():
        emb.grad = None
        loss_fn().backward()

    return run


def measure(loss_name, batch_size, num_classes, mu, dim, device, repeats):
    torch.manual_seed(0)
    scale = 23.0
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    labels = torch.where(labels == labels.roll(1), (labels + 1) % num_classes, labels)
    emb = torch.randn(batch_size, dim, device=device, requires_grad=True)
    if loss_name == "NormalizedSoftmaxLoss":
        inner = losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=1 / scale)
        weight_rows = lambda: inner.W.t()  # noqa: E731
    else:
        inner = losses.ProxyAnchorLoss(num_classes, dim)
        weight_rows = None
    inner.to(device)
    wrapper = ProxySynthesisLoss(inner, mu=mu)
    lam = torch.tensor(0.3, device=device)
    candidates = {
        "bare": fwd_bwd(lambda: inner(emb, labels), emb),
        "wrapper": fwd_bwd(lambda: wrapper(emb, labels), emb),
    }
    if weight_rows is not None:
        candidates["official"] = fwd_bwd(
            lambda: official_norm_softmax_ps(
                emb, weight_rows(), labels, lam, mu, scale
            ),
            emb,
        )
    times = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved, so drift hits every candidate alike
        for name, fn in candidates.items():
            times[name].append(time_call(fn, device))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a small grid, no file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dim = 512
    batch_sizes, class_counts, mus = (64, 180), (100, 1000, 11318), (0.5, 1.0, 2.0)
    if args.quick:
        batch_sizes, class_counts, mus = (64,), (100, 1000), (1.0,)
    machine = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    )
    header = (
        "| loss | B | C | mu | M | bare ms | wrapper ms | official ms | wrapper/bare "
        "| ideal | (wrapper/bare)/ideal | wrapper/official |"
    )
    lines = [header, "|" + "---|" * 12]
    print(header, flush=True)
    for loss_name in ("NormalizedSoftmaxLoss", "ProxyAnchorLoss"):
        for batch_size in batch_sizes:
            for num_classes in class_counts:
                for mu in mus:
                    ms = measure(
                        loss_name,
                        batch_size,
                        num_classes,
                        mu,
                        dim,
                        device,
                        args.repeats,
                    )
                    m = int(math.floor(mu * batch_size + 0.5))
                    ideal = (
                        (batch_size + m)
                        * (num_classes + m)
                        / (batch_size * num_classes)
                    )
                    ratio = ms["wrapper"] / ms["bare"]
                    official = ms.get("official")
                    cells = [
                        loss_name,
                        batch_size,
                        num_classes,
                        mu,
                        m,
                        f"{ms['bare']:.2f}",
                        f"{ms['wrapper']:.2f}",
                        f"{official:.2f}" if official else "n/a",
                        f"{ratio:.2f}",
                        f"{ideal:.2f}",
                        f"{ratio / ideal:.2f}",
                        f"{ms['wrapper'] / official:.2f}" if official else "n/a",
                    ]
                    row = "| " + " | ".join(str(c) for c in cells) + " |"
                    lines.append(row)
                    print(row, flush=True)
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ps-cost-{device.type}.md"
    out.write_text(
        "# ProxySynthesisLoss cost: forward + backward\n\n"
        f"Machine: {machine}; torch {torch.__version__}, {args.threads} threads; "
        f"D = {dim}; median of {args.repeats} interleaved repeats. "
        "Produced by `python benchmarks/ps_cost.py`.\n\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
