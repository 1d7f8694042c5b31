"""The accuracy benchmark: its --quick mode end to end (as CI runs it), resumability,
and the paired-difference summary against a hand computation."""

import csv
import statistics

import pytest

from . import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("accuracy")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_mode_end_to_end_and_resume(bench, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--quick", "--results-dir", str(results), "--data-root", str(tmp_path)]
    assert bench.main(argv) == 0
    rows = read_csv(results / "glyphs-quick.csv")
    assert list(rows[0]) == bench.COLUMNS
    expected = {(r.method, s) for r in bench.ROWS for s in (0, 1, 2)}
    assert {(r["method"], int(r["seed"])) for r in rows} == expected
    for r in rows:
        assert 0 <= float(r["recall_at_1"]) <= float(r["recall_at_8"]) <= 100
        assert float(r["train_seconds"]) > 0
    assert {r["ps"] for r in rows if r["method"].endswith("+ps")} == {"1"}
    table = (results / "glyphs-quick.md").read_text()
    for row in bench.ROWS:
        assert f"| {row.method} | 3 |" in table
    assert (results / "glyphs-quick.png").stat().st_size > 0

    capsys.readouterr()
    assert bench.main(argv) == 0  # resumable: every run is already done
    assert f"{len(expected)} runs done, 0 to go" in capsys.readouterr().out
    assert len(read_csv(results / "glyphs-quick.csv")) == len(expected)


def fake_run_one(row, dataset, seed, extra):
    """run_one without training: fails for proxy_anchor+ps seed 0."""
    if (row.method, seed) == ("proxy_anchor+ps", 0):
        raise RuntimeError("this run failed")
    record = {"dataset": dataset, "method": row.method, "loss": row.loss,
              "ps": int(row.ps), "shared_head": 0, "seed": seed, "train_seconds": 1.0}  # fmt: skip
    return record | dict.fromkeys(["recall_at_1", "recall_at_2", "recall_at_4",
                                   "recall_at_8", "map_at_r", "r_precision", "nmi"], 50.0)  # fmt: skip


def test_a_failed_run_keeps_the_others(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_one", fake_run_one)
    argv = ["--results-dir", str(tmp_path), "--methods", "proxy_anchor",
            "proxy_anchor+ps", "--seeds", "0", "1", "--jobs", "1"]  # fmt: skip
    assert bench.main(argv) == 1
    assert "proxy_anchor+ps seed 0: RuntimeError: this run failed" in (
        capsys.readouterr().err
    )
    done = {(r["method"], r["seed"]) for r in read_csv(tmp_path / "glyphs.csv")}
    assert done == {("proxy_anchor", "0"), ("proxy_anchor", "1"), ("proxy_anchor+ps", "1")}  # fmt: skip
    assert "| proxy_anchor+ps | 1 |" in (tmp_path / "glyphs.md").read_text()


def test_runs_are_resumed_only_under_their_protocol(bench, tmp_path, monkeypatch, capsys):  # fmt: skip
    monkeypatch.setattr(bench, "run_one", fake_run_one)
    argv = ["--results-dir", str(tmp_path), "--methods", "proxy_anchor", "--seeds", "0"]
    assert bench.main(argv + ["--", "--epochs", "3"]) == 0
    assert (tmp_path / "glyphs.protocol").read_text().endswith("--epochs 3\n")
    with pytest.raises(SystemExit):
        bench.main(argv + ["--", "--epochs", "4"])
    assert "made with `--epochs 8" in capsys.readouterr().err
    assert bench.main(argv + ["--", "--epochs", "3"]) == 0  # the same protocol: resumed
    assert len(read_csv(tmp_path / "glyphs.csv")) == 1


def test_paired_difference_by_hand(bench):
    base, ps = [60.0, 62.0, 61.0], [63.0, 62.5, 64.0]
    records = {}
    for seed, (b, p) in enumerate(zip(base, ps)):
        records[("proxy_anchor", seed)] = {"seed": seed, "map_at_r": b}
        records[("proxy_anchor+ps", seed)] = {"seed": seed, "map_at_r": p}
    for rec in records.values():
        rec.update({c: 1.0 for c in bench.METRICS if c != "map_at_r"})
        rec["train_seconds"] = 1.0
    rows = [r for r in bench.ROWS if r.method in ("proxy_anchor", "proxy_anchor+ps")]
    table = bench.summarise(records, rows, "t")
    diffs = [p - b for b, p in zip(base, ps)]
    expected = f"{statistics.mean(diffs):.2f} ± {statistics.stdev(diffs):.2f}"
    line = next(x for x in table.splitlines() if x.startswith("| proxy_anchor+ps |"))
    assert f"{expected} (vs proxy_anchor)" in line


def test_summary_without_the_baseline(bench):
    """A PS row run on its own (--methods) is summarised with Δ n/a, not a crash."""
    records = {("proxy_anchor+ps", 0): {"seed": 0, "train_seconds": 1.0}}
    records[("proxy_anchor+ps", 0)].update({c: 50.0 for c in bench.METRICS})
    rows = [r for r in bench.ROWS if r.method == "proxy_anchor+ps"]
    table = bench.summarise(records, rows, "t")
    line = next(x for x in table.splitlines() if x.startswith("| proxy_anchor+ps |"))
    assert line.endswith("| n/a (vs proxy_anchor) |")


def fake_quick_run(row, dataset, seed, extra):
    """fake_run_one that fails unless the example would train the quick budget."""
    bench = load_benchmark("accuracy")
    args = bench.load_example().parse_args(bench.row_argv(row, dataset, seed, extra))
    if (args.epochs, args.max_train_images) != (1, 1500):
        raise RuntimeError(f"not quick: {args.epochs} epochs")
    return fake_run_one(row, dataset, seed, extra)


def test_quick_mode_overrides_a_rows_own_flags(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_one", fake_quick_run)
    argv = ["--quick", "--results-dir", str(tmp_path), "--methods",
            "proxy_anchor epochs=128", "--seeds", "0", "--jobs", "1"]  # fmt: skip
    assert bench.main(argv) == 0, capsys.readouterr().err


def test_every_run_failed(bench, tmp_path, monkeypatch, capsys):
    """No summary to write, exit status 1, and the failure named."""
    monkeypatch.setattr(bench, "run_one", fake_run_one)
    argv = ["--results-dir", str(tmp_path), "--methods", "proxy_anchor+ps",
            "--seeds", "0", "--jobs", "1"]  # fmt: skip
    assert bench.main(argv) == 1
    assert "proxy_anchor+ps seed 0: RuntimeError" in capsys.readouterr().err
    assert not (tmp_path / "glyphs.md").exists()
