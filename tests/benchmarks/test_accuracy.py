"""The accuracy benchmark: its --quick mode end to end (as CI runs it), resumability,
and the paired-difference summary against a hand computation."""

import csv
import statistics
from types import SimpleNamespace

import pytest
from matplotlib.axes import Axes

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


def test_flags_the_example_refuses_stop_it_before_anything_is_written(
    bench, tmp_path, monkeypatch, capsys
):
    """Every run's command line is parsed by the example first: a bad flag after --
    is a usage error naming the row and the example's message, and claims no
    protocol (which would refuse the corrected command in that folder)."""
    monkeypatch.setattr(bench, "run_one", fake_run_one)
    argv = ["--results-dir", str(tmp_path / "new"), "--seeds", "0", "--jobs", "1"]
    for extra, message in [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--num-threads", "-1"], "argument --num-threads: must be >= 0, got -1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv + ["--methods", "proxy_anchor", "--", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "refuses the flags of row 'proxy_anchor' seed 0" in err
        assert message in err
    # valid for one row, not for another: the PS options need a PS row
    with pytest.raises(SystemExit):
        bench.main(argv + ["--methods", "proxy_anchor+ps", "margin", "--", "--ps-mu", "1"])  # fmt: skip
    assert "row 'margin' seed 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(argv + ["--methods", "proxy_anchor", "--seeds", "-1"])
    assert (
        "argument --seeds: must be in [0, 2**32 - 1], got -1" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + ["--jobs", "0"])
    assert exit_info.value.code == 2
    assert "argument --jobs: must be > 0, got 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_summary_cells_by_hand(bench):
    """The summary line of a counterpart, cell by cell: each column's own mean ± sample
    std (two seeds), and the signed paired Δ MAP@R written out by hand, with the runs
    in completion order (as the CSV holds them), not seed order."""
    columns = list(bench.METRICS) + ["train_seconds"]
    map_at_r = {("proxy_anchor", 0): 60.0, ("proxy_anchor", 1): 64.0,
                ("proxy_anchor+ps", 0): 58.0, ("proxy_anchor+ps", 1): 63.0}  # fmt: skip
    records = {}
    for method, seed in [("proxy_anchor+ps", 1), ("proxy_anchor", 0),
                         ("proxy_anchor+ps", 0), ("proxy_anchor", 1)]:  # fmt: skip
        record = {"seed": seed, "map_at_r": map_at_r[(method, seed)]}
        for i, column in enumerate(columns):
            record.setdefault(column, 10.0 * (i + 1) + 3 * seed)  # its own values
        records[(method, seed)] = record
    rows = [r for r in bench.ROWS if r.method in ("proxy_anchor", "proxy_anchor+ps")]
    lines = [
        x for x in bench.summarise(records, rows, "t").splitlines() if x[:1] == "|"
    ]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert all(x.count("|") == lines[0].count("|") for x in lines)
    line = next(x for x in lines if x.startswith("| proxy_anchor+ps |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # per seed -2.0 and -1.0: mean -1.50, sample std sqrt(0.5) = 0.71
    assert cells[-1] == "-1.50 ± 0.71 (vs proxy_anchor)"
    for column in columns:
        values = [records[("proxy_anchor+ps", s)][column] for s in (0, 1)]
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert cells[header.index(column)] == f"{mean:.2f} ± {std:.2f}", column


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
    # a quick run has its own results, beside (not in) the real ones
    assert sorted(p.name for p in tmp_path.glob("glyphs*.csv")) == ["glyphs-quick.csv"]
    assert (tmp_path / "glyphs-quick.protocol").read_text() == " ".join(
        bench.QUICK
    ) + "\n"


def test_every_run_failed(bench, tmp_path, monkeypatch, capsys):
    """No summary to write, exit status 1, and the failure named."""
    monkeypatch.setattr(bench, "run_one", fake_run_one)
    argv = ["--results-dir", str(tmp_path), "--methods", "proxy_anchor+ps",
            "--seeds", "0", "--jobs", "1"]  # fmt: skip
    assert bench.main(argv) == 1
    assert "proxy_anchor+ps seed 0: RuntimeError" in capsys.readouterr().err
    assert not (tmp_path / "glyphs.md").exists()


# the options a counterpart may change against its baseline: Proxy Synthesis's and the
# shared head's (everything else, e.g. --epochs, is the protocol they share)
METHOD_OPTIONS = {"ps", "ps_mu", "ps_alpha", "ps_exclude_parents",
                  "ps_detach_parent_proxies", "ps_positive_divisor", "shared_head",
                  "decorrelation_rho", "shared_weight", "shared_strategy"}  # fmt: skip


@pytest.fixture(scope="module")
def example(bench):
    return bench.load_example()


def row_sets(bench):
    return [(bench.ROWS + bench.SUPPLEMENTARY_ROWS, bench.PROTOCOL),
            (bench.SWEEP_ROWS, bench.SWEEP_PROTOCOL)]  # fmt: skip


def test_rows_train_what_their_names_say(bench, example):
    """Each row's method name (loss, +ps, +shared) matches its fields and the flags the
    example receives; a row's own flags win over the protocol's (e.g. --epochs)."""
    for rows, protocol in row_sets(bench):
        assert len({r.method for r in rows}) == len(rows)  # one CSV key per row
        for row in rows:
            name = row.method.split()[0]
            assert name.split("+")[0] == row.loss, row
            assert ("+ps" in name, "+shared" in name) == (row.ps, row.shared_head), row
            args = example.parse_args(bench.row_argv(row, "glyphs", 3, protocol))
            assert (args.loss, args.ps, args.shared_head, args.seed) == (
                row.loss, row.ps, row.shared_head, 3
            ), row  # fmt: skip
            tags = dict(t.split("=") for t in row.method.split()[1:] if "=" in t)
            expected_epochs = int(tags.get("epochs", protocol[1]))
            assert args.epochs == expected_epochs, row


def test_ps_rows_run_the_papers_algorithm_unless_their_flags_change_it(bench, example):
    """The committed PS rows were made with the paper's gradients and negatives: they keep
    them whatever the example's defaults for the loss (ProxyAnchor's are the trunk-only
    variant), and a row's own flags, or flags after --, still switch them on."""
    for rows, protocol in row_sets(bench):
        for row in (r for r in rows if r.ps):
            args = example.parse_args(bench.row_argv(row, "glyphs", 0, protocol))
            assert args.ps_exclude_parents == ("--ps-exclude-parents" in row.flags), row
            assert not args.ps_detach_parent_proxies, row
    row = next(r for r in bench.ROWS if r.method == "proxy_anchor+ps")
    extra = ["--ps-exclude-parents", "--ps-detach-parent-proxies"]
    args = example.parse_args(bench.row_argv(row, "glyphs", 0, extra))
    assert args.ps_exclude_parents and args.ps_detach_parent_proxies


def test_counterparts_differ_from_their_baselines_in_the_method_only(bench, example):
    """The paired Δ compares a row with its baseline under the same protocol: parsed by
    the example, the two differ only in Proxy Synthesis's or the shared head's options."""
    for rows, protocol in row_sets(bench):
        by_method = {r.method: r for r in rows}
        for row in rows:
            if not row.baseline:
                continue
            base = by_method[row.baseline]
            assert not base.baseline and not base.ps and not base.shared_head, row
            got = vars(example.parse_args(bench.row_argv(row, "glyphs", 0, protocol)))
            want = vars(example.parse_args(bench.row_argv(base, "glyphs", 0, protocol)))
            changed = {k for k in got if got[k] != want[k]}
            assert changed and changed <= METHOD_OPTIONS, (row.method, changed)


def fake_parse_args(argv):
    """The example's parse_args, recording its argv (for a fake run)."""
    return SimpleNamespace(argv=argv, epochs=5)


def test_run_one_records_the_examples_last_metrics_in_percent(bench, monkeypatch):
    """Each CSV column holds its own metric of the example's last evaluation, x 100."""
    calls = {}

    def run(args):
        calls["args"] = args
        return {"last": {"recall_at_1": 0.5, "recall_at_2": 0.61, "recall_at_4": 0.72,
                         "recall_at_8": 0.83, "mean_average_precision_at_r": 0.31234,
                         "r_precision": 0.4, "NMI": 0.9, "epoch": 5}}  # fmt: skip

    example = bench.example_module()
    monkeypatch.setattr(example, "parse_args", fake_parse_args)
    monkeypatch.setattr(example, "run", run)
    row = next(r for r in bench.ROWS if r.method == "proxy_anchor+ps")
    record = bench.run_one(row, "glyphs", 2, ["--epochs", "5"])
    assert {k: record[k] for k in bench.METRICS} == {
        "recall_at_1": "50.000", "recall_at_2": "61.000", "recall_at_4": "72.000",
        "recall_at_8": "83.000", "map_at_r": "31.234", "r_precision": "40.000",
        "nmi": "90.000",
    }  # fmt: skip
    assert (record["method"], record["ps"], record["shared_head"], record["seed"]) == (
        "proxy_anchor+ps",
        1,
        0,
        2,
    )
    assert calls["args"].test_interval == 5  # evaluated once, after the last epoch
    assert "--no-plots" in calls["args"].argv


def test_head_weightings_of_shared_head_runs_go_to_their_own_csv(
    bench, tmp_path, monkeypatch
):
    """A shared-head run's other weightings (results.json "heads") are kept, one CSV
    row per weighting, in %; the main CSV keeps its columns."""
    heads = {
        "class": {"recall_at_1": 0.5, "recall_at_2": 0.6, "recall_at_4": 0.7,
                  "recall_at_8": 0.8, "mean_average_precision_at_r": 0.25,
                  "r_precision": 0.3, "NMI": 0.9},
        "class_0.5_shared_1": {"recall_at_1": 0.4, "recall_at_2": 0.5,
                               "recall_at_4": 0.6, "recall_at_8": 0.7,
                               "mean_average_precision_at_r": 0.125,
                               "r_precision": 0.2, "NMI": 0.8},
    }  # fmt: skip
    last = heads["class"] | {"mean_average_precision_at_r": 0.2}
    example = bench.example_module()
    monkeypatch.setattr(example, "parse_args", fake_parse_args)
    monkeypatch.setattr(example, "run", lambda args: {"last": last, "heads": heads})
    argv = ["--results-dir", str(tmp_path), "--methods", "margin+shared", "--seeds",
            "3", "--jobs", "1"]  # fmt: skip
    assert bench.main(argv) == 0
    (run,) = read_csv(tmp_path / "glyphs.csv")
    assert run["map_at_r"] == "20.000" and "weighting" not in run
    rows = read_csv(tmp_path / "glyphs-heads.csv")
    assert [(r["method"], r["seed"], r["weighting"], r["map_at_r"]) for r in rows] == [
        ("margin+shared", "3", "class", "25.000"),
        ("margin+shared", "3", "class_0.5_shared_1", "12.500"),
    ]
    assert rows[1]["nmi"] == "80.000"
    # redone (its main record lost): its weightings replace the earlier ones
    (tmp_path / "glyphs.csv").unlink()
    (tmp_path / "glyphs.protocol").unlink()
    assert bench.main(argv) == 0
    assert len(read_csv(tmp_path / "glyphs-heads.csv")) == 2


def test_row_sets_their_protocols_and_files(bench, tmp_path, monkeypatch, capsys):
    """--supplementary runs the supplementary rows; --sweep the sweep rows, under the
    sweep's protocol, into its own files; an unknown row or both flags is a usage
    error."""
    monkeypatch.setattr(bench, "run_one", fake_run_one)
    monkeypatch.setattr(bench, "plot", lambda *args: None)
    argv = ["--seeds", "1", "--jobs", "1", "--results-dir"]
    assert bench.main(["--supplementary", *argv, str(tmp_path / "s")]) == 0
    methods = {r["method"] for r in read_csv(tmp_path / "s" / "glyphs.csv")}
    assert methods == {r.method for r in bench.SUPPLEMENTARY_ROWS}
    assert bench.main(["--sweep", *argv, str(tmp_path / "w")]) == 0
    sweep = tmp_path / "w" / "glyphs-proxy-anchor-sweep"
    methods = {r["method"] for r in read_csv(sweep.with_suffix(".csv"))}
    assert methods == {r.method for r in bench.SWEEP_ROWS}
    assert sweep.with_suffix(".protocol").read_text() == (
        " ".join(bench.SWEEP_PROTOCOL) + "\n"
    )
    for row in bench.SWEEP_ROWS:
        assert f"| {row.method} | 1 |" in sweep.with_suffix(".md").read_text()
    for bad in (["--methods", "no_such_row"], ["--sweep", "--supplementary"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main([*bad, *argv, str(tmp_path / "x")])
        assert exit_info.value.code == 2
    assert not (tmp_path / "x" / "glyphs.csv").exists()


def test_bars_are_means_with_sample_std(bench, tmp_path, monkeypatch):
    """The chart's bars: per-method means of MAP@R and R@1 in table order, sample-std
    error bars, baselines gray and counterparts blue."""
    drawn = []
    barh = Axes.barh

    def spy(self, y, width, *args, **kwargs):
        drawn.append((list(y), list(width), list(kwargs["xerr"]), kwargs["color"]))
        return barh(self, y, width, *args, **kwargs)

    monkeypatch.setattr(Axes, "barh", spy)
    values = {("proxy_anchor", 0): (60.0, 70.0), ("proxy_anchor", 1): (62.0, 71.0),
              ("proxy_anchor+ps", 0): (63.0, 72.0),
              ("proxy_anchor+ps", 1): (66.0, 75.0)}  # fmt: skip
    records = {
        key: {"seed": key[1], "map_at_r": m, "recall_at_1": r}
        for key, (m, r) in values.items()
    }
    rows = [r for r in bench.ROWS if r.method in ("proxy_anchor", "proxy_anchor+ps")]
    bench.plot(records, rows, tmp_path / "p.png")
    assert len(drawn) == 2
    for metric, (methods, means, errors, colors) in enumerate(drawn):
        assert methods == ["proxy_anchor", "proxy_anchor+ps"]
        for method, mean, error in zip(methods, means, errors):
            seeds = [values[(method, s)][metric] for s in (0, 1)]
            assert mean == pytest.approx(statistics.mean(seeds))
            assert error == pytest.approx(statistics.stdev(seeds))
        assert list(colors) == ["tab:gray", "tab:blue"]


def test_summary_covers_the_rows_of_earlier_invocations(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_one", fake_run_one)
    argv = ["--results-dir", str(tmp_path), "--seeds", "1", "2", "--jobs", "1"]
    assert bench.main(argv + ["--methods", "proxy_anchor"]) == 0
    assert bench.main(argv + ["--methods", "proxy_anchor+ps"]) == 0
    table = (tmp_path / "glyphs.md").read_text()
    assert "| proxy_anchor | 2 |" in table
    assert "| proxy_anchor+ps | 2 |" in table


def test_photo_datasets_use_the_examples_defaults(bench, tmp_path, monkeypatch):
    """--dataset cub gets the example's photo recipe: none of the glyphs protocol."""
    monkeypatch.setattr(bench, "run_one", fake_run_one)
    argv = ["--dataset", "cub", "--results-dir", str(tmp_path), "--methods",
            "proxy_anchor", "--seeds", "1", "--jobs", "1"]  # fmt: skip
    assert bench.main(argv) == 0
    assert (tmp_path / "cub.protocol").read_text() == "\n"
    title = (tmp_path / "cub.md").read_text().splitlines()[0]
    assert title == "# cub: accuracy benchmark (`--data-root data --num-threads 1`)"
