"""The cost benchmark's references and its --quick mode: the ratios it reports are only
meaningful if its "official" function computes what the wrapper computes, and if its two
miner loops sample what they claim to."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses
from scipy import stats

from pml_proxysynth.losses import ProxySynthesisLoss

from .. import TEST_DEVICE
from . import BENCHMARKS, load_benchmark

SCRIPT = BENCHMARKS / "cost.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("cost")


# mu 0.3: M = round(0.3 * 16) = round(4.8) = 5 synthetic classes, as the wrapper makes;
# B 13, mu 0.5 and B 7, mu 1.5: mu * B ends in .5, rounded up (7 and 11, as the wrapper)
@pytest.mark.parametrize(
    "batch_size, num_classes, mu",
    [
        (16, 4, 0.3),
        (16, 4, 0.5),
        (16, 4, 1.0),
        (16, 4, 2.0),
        (13, 13, 0.5),
        (7, 7, 1.5),
    ],
)
def test_official_function_equals_wrapper_with_roll_pairing(
    bench, batch_size, num_classes, mu
):
    """Forward value and gradients, float64: the same computation as the wrapper over
    NormalizedSoftmaxLoss with the official roll pairing (i with i-1, then i-2 for
    mu > 1) and the same lam."""
    dim, scale = 8, 23.0
    # rows i, i-1 and i-2 (cyclically) are of different classes, as roll pairing needs
    labels = torch.arange(batch_size, device=TEST_DEVICE) % num_classes
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(batch_size, dim, generator=gen, dtype=torch.float64)
    emb = emb.to(TEST_DEVICE).requires_grad_()
    inner = losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=1 / scale)
    inner = inner.to(TEST_DEVICE, torch.float64)
    wrapper = ProxySynthesisLoss(inner, mu=mu, pairing="roll")

    torch.manual_seed(1)
    lam = wrapper.synthesize(emb, labels).lam
    torch.manual_seed(1)
    loss = wrapper(emb, labels)
    grads = torch.autograd.grad(loss, [emb, inner.W])
    expected = bench.official_norm_softmax_ps(emb, inner.W.t(), labels, lam, mu, scale)
    expected_grads = torch.autograd.grad(expected, [emb, inner.W])

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_loop_references_sample_alike_and_meet_the_class_constraints(bench):
    """Both loops serve every anchor of a batch with 3+ classes with an inter-class
    triplet, and, from the same numpy seed, draw the same triplets: the per-anchor
    (authors') structure and the matrix one compute the same probabilities."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4, 5])
    emb = torch.randn(len(labels), 16, generator=gen)
    for full in (False, True):
        draws = {}
        for per_anchor in (True, False):
            np.random.seed(7)
            draws[per_anchor] = bench.loop_reference(emb, labels, full, per_anchor)
            a, p, n = (torch.tensor(t) for t in draws[per_anchor])
            assert a.tolist() == list(range(len(labels)))
            assert (labels[a] != labels[p]).all()
            assert (labels[a] != labels[n]).all()
            assert (labels[p] != labels[n]).all()
        assert draws[True] == draws[False], f"full={full}"


@pytest.mark.parametrize("per_anchor", [True, False])
def test_loop_reference_negatives_follow_the_distance_weighting(bench, per_anchor):
    """Chi-square of one anchor's negatives over many calls against Wu et al.'s weights,
    written out here: w_j = D^(2-d) (1 - D^2/4)^(-(d-3)/2), D clamped below at 0.5."""
    dim, cutoff, calls = 6, 0.5, 3000
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    emb = torch.nn.functional.normalize(
        torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(3)), dim=1
    )
    dist = torch.linalg.vector_norm(emb[0] - emb, dim=1).double().clamp(min=cutoff)
    weights = dist ** (2 - dim) * (1 - dist**2 / 4) ** (-(dim - 3) / 2)
    weights[labels == labels[0]] = 0
    expected = (weights / weights.sum() * calls).numpy()

    np.random.seed(0)
    counts = np.zeros(len(labels))
    for _ in range(calls):
        _, _, negatives = bench.loop_reference(emb, labels, False, per_anchor, cutoff)
        counts[negatives[0]] += 1
    allowed = expected > 0
    assert counts[~allowed].sum() == 0
    assert stats.chisquare(counts[allowed], expected[allowed]).pvalue > 1e-3


def test_loop_reference_skips_anchors_without_two_other_classes(bench):
    labels = torch.tensor([0, 0, 1, 1])
    emb = torch.randn(len(labels), 8)
    for full in (False, True):
        for per_anchor in (True, False):
            assert bench.loop_reference(emb, labels, full, per_anchor) == ([], [], [])


def test_quick_run_reports_every_section_and_target(tmp_path):
    out = tmp_path / "cost.md"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    report = out.read_text()
    for section in ("## ps:", "## miner:", "## train-step:"):
        assert section in report
    verdicts = [line for line in report.splitlines() if line.startswith("- ")]
    assert sum(line.endswith(": met") or ": MISSED" in line for line in verdicts) >= 4


def target_line(lines, start):
    (line,) = [x for x in lines if x.startswith(start)]
    return line


def test_ps_targets_on_a_fake_timing_table(bench, monkeypatch):
    """--quick grid (B 64, C 100 and 1000, mu 1, so M = 64): the verdicts recomputed
    here from the ideal (B+M)(C+M)/(BC) = 3.28 (C 100) and 2.128 (C 1000)."""
    wrapper = {100: 10.0, 1000: 2.128 * 1.2}  # C 100 is exempt; C 1000 is 1.20x ideal
    # C 100: exactly as fast as the official function, which meets "never slower";
    # C 1000: 1.10x slower than it
    official = {100: 10.0, 1000: 2.128 * 1.2 / 1.1}

    def cell(loss_name, batch_size, num_classes, mu, dim, device, config):
        t = {"bare": 1.0, "wrapper": wrapper[num_classes]}
        if loss_name == "NormalizedSoftmaxLoss":
            t["official"] = official[num_classes]
        return {k: bench.Timing(v, 5) for k, v in t.items()}, {}

    monkeypatch.setattr(bench, "ps_cell", cell)
    lines = bench.run_ps(torch.device("cpu"), bench.TimingConfig(5, 1, 1.0), True)
    ideal = target_line(lines, "- wrapper/bare within 1.15x")
    assert ideal.endswith(
        "MISSED (NormalizedSoftmaxLoss B=64 C=1000 mu=1.0: 1.20; "
        "ProxyAnchorLoss B=64 C=1000 mu=1.0: 1.20)"
    )
    slower = target_line(lines, "- wrapper never slower")
    assert slower.endswith("MISSED (NormalizedSoftmaxLoss B=64 C=1000 mu=1.0: 1.10)")
    row = [x for x in lines if x.startswith("| NormalizedSoftmaxLoss | 64 | 1000 |")]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[4] == "64" and cells[9] == "2.13" and cells[10] == "1.20"


def test_miner_targets_on_a_fake_timing_table(bench, monkeypatch):
    """--quick grid (B 112 and 256, D 128); the ratios are time(other) / time(miner)."""
    ms = {"standard": 1.0, "full": 2.0, "DWM": 1.5, "TMM-semihard": 4.0}
    ms.update({"loop-std": 30.0, "loop-full": 30.0})  # 30x, 15x
    ms.update({"matrix-loop-std": 25.0, "matrix-loop-full": 50.0})  # 25x, 25x
    monkeypatch.setattr(
        bench,
        "time_round_robin",
        lambda fns, device, config: {
            name: bench.Timing(ms[name] / 1e3, 5) for name in fns
        },
    )
    lines = bench.run_miner(
        torch.device("cpu"), bench.TimingConfig(5, 1, 1.0), True, 2, "semihard"
    )
    dwm = target_line(lines, "- no slower than DistanceWeightedMiner")
    assert dwm.endswith(
        "MISSED (B=112 D=128: 1.50x / 0.75x; B=256 D=128: 1.50x / 0.75x)"
    )
    loop = target_line(lines, "- >= 20x faster than the loop")
    assert loop.endswith("MISSED (B=256 D=128: 30.0x / 15.0x)")
    assert target_line(lines, "- the same against the half-vectorised").endswith(
        ": met"
    )
    # the full grid: the loop target is judged at B = 256 only (not at B 1024)
    lines = bench.run_miner(
        torch.device("cpu"), bench.TimingConfig(5, 1, 1.0), False, 2, "semihard"
    )
    loop = target_line(lines, "- >= 20x faster than the loop")
    assert loop.endswith(
        "MISSED (B=256 D=128: 30.0x / 15.0x; B=256 D=512: 30.0x / 15.0x)"
    )


def test_round_robin_repeats_adapt_to_the_budget(bench, monkeypatch):
    """Fake call times, budget 3 s, at most 10 repeats, 2 warm-up calls: "fast" (1-4 ms)
    gets 10 timed calls; "slow" (1 s) budget / 1 s = 3; "slower" (2 s) stops warming up
    after one call (2 calls would exceed the budget) and gets the minimum, 3. The
    medians are of the timed calls only, one call of each candidate per round."""
    seconds = {"fast": [0.01, 0.001] + [0.001, 0.002, 0.003] * 3 + [0.004],
               "slow": [1.0, 1.0] + [1.0, 3.0, 2.0],
               "slower": [2.0] + [5.0, 4.0, 2.0]}  # fmt: skip
    order = []

    def fake_time_call(fn, device):
        order.append(fn.name)
        return seconds[fn.name].pop(0)

    def candidate(name):
        fn = lambda: None  # noqa: E731
        fn.name = name
        return fn

    monkeypatch.setattr(bench, "time_call", fake_time_call)
    config = bench.TimingConfig(repeats=10, warmup=2, budget=3.0)
    timings = bench.time_round_robin(
        {name: candidate(name) for name in seconds}, None, config
    )
    assert timings == {
        "fast": bench.Timing(0.002, 10),
        "slow": bench.Timing(2.0, 3),
        "slower": bench.Timing(4.0, 3),
    }
    assert order[:5] == ["fast", "fast", "slow", "slow", "slower"]
    assert order[5:14] == ["fast", "slow", "slower"] * 3
    assert order[14:] == ["fast"] * 7
    assert all(not times for times in seconds.values())


def test_train_step_ratios_on_a_fake_timing_table(bench, monkeypatch):
    """Each configuration's ms/step against the baseline's and against PS's."""
    ms = {"baseline": 10.0, "PS": 12.0, "PS + shared head": 15.0}
    monkeypatch.setattr(bench, "training_step", lambda ex, flags, x, labels, seed: None)
    monkeypatch.setattr(
        bench,
        "time_round_robin",
        lambda fns, device, config: {n: bench.Timing(ms[n] / 1e3, 5) for n in fns},
    )
    lines = bench.run_train_step(torch.device("cpu"), bench.TimingConfig(5, 1, 1.0), 0)
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ms:
            rows[cells[0]] = cells[2:5]
    assert rows == {
        "baseline": ["10.000", "1.00", "n/a"],
        "PS": ["12.000", "1.20", "1.00"],
        "PS + shared head": ["15.000", "1.50", "1.25"],
    }


def test_quick_run_never_replaces_the_results(bench, tmp_path, monkeypatch):
    """Without --out, --quick writes nothing; a full run writes results/cost-<device>.md."""
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "run_ps", lambda device, config, quick: ["## ps: fake"])
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--device", "cpu", "--sections", "ps"])
        assert list(tmp_path.iterdir()) == []
        bench.main(["--device", "cpu", "--sections", "ps", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert "## ps: fake" in (tmp_path / "cost-cpu.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "0"], "argument --threads: must be > 0, got 0"),
        # 0 repeats used to mean "unset" (the section's default), silently
        (["--repeats", "0"], "argument --repeats: must be > 0, got 0"),
        (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
        (["--budget", "nan"], "argument --budget: must be finite and > 0, got nan"),
        (["--seed", "-1"], "argument --seed: must be in [0, 2**32 - 1], got -1"),
    ],
)
def test_bad_arguments_are_usage_errors(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
