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
