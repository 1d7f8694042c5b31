"""benchmarks/shared_head_fonts.py: its font measures against brute-force loops, and a
tiny run end to end."""

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from . import load_benchmark


@pytest.fixture(scope="module")
def fonts_bench():
    return load_benchmark("shared_head_fonts")


def random_glyphs(num_images=40, num_classes=6, num_fonts=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice([3, 10, 11, 20, 21, 40][:num_classes], num_images)
    fonts = rng.integers(0, num_fonts, num_images)
    embeddings = torch.randn(
        num_images, 5, generator=torch.Generator().manual_seed(seed)
    )
    return embeddings, labels, fonts


def test_font_match_at_k_against_a_loop(fonts_bench):
    embeddings, labels, fonts = random_glyphs()
    unit = F.normalize(embeddings.double(), dim=1)
    fractions = []
    for i in range(len(labels)):
        others = [j for j in range(len(labels)) if labels[j] != labels[i]]
        nearest = sorted(others, key=lambda j: -float(unit[i] @ unit[j]))[:5]
        fractions.append(np.mean([fonts[j] == fonts[i] for j in nearest]))
    # chunks of 7 queries: the last one is partial
    got = fonts_bench.font_match_at_k(embeddings, labels, fonts, k=5, chunk=7)
    assert got == pytest.approx(np.mean(fractions), abs=1e-6)
    assert got != pytest.approx(  # the other classes' neighbours only
        fonts_bench.font_match_at_k(embeddings, np.arange(40), fonts, k=5), abs=1e-3
    )


def test_font_chance_against_a_loop(fonts_bench):
    _, labels, fonts = random_glyphs(seed=1)
    expected = np.mean(
        [np.mean(fonts[labels != labels[i]] == fonts[i]) for i in range(len(labels))]
    )
    assert fonts_bench.font_chance(labels, fonts) == pytest.approx(expected)


def test_font_indices_of_a_dataset_and_of_a_subset(fonts_bench):
    dataset = SimpleNamespace(font_indices=np.array([4, 5, 6, 7]))
    assert list(fonts_bench.font_indices(dataset)) == [4, 5, 6, 7]
    subset = SimpleNamespace(dataset=dataset, indices=np.array([3, 1]))
    assert list(fonts_bench.font_indices(subset)) == [7, 5]


def test_tiny_run_end_to_end_and_resume(fonts_bench, tmp_path, monkeypatch, capsys):
    """One seed of a baseline and its shared-head row on a few glyphs, one epoch: a
    record per stage and part, the summary, and a second call that trains nothing."""
    accuracy = fonts_bench.accuracy
    monkeypatch.setattr(accuracy, "PROTOCOL", list(accuracy.QUICK))
    results = tmp_path / "results"
    argv = ["--seeds", "0", "--jobs", "1", "--data-root", str(tmp_path),
            "--results-dir", str(results)]  # fmt: skip
    assert fonts_bench.main(argv) == 0
    with (results / "glyphs-shared-head-fonts.csv").open() as f:
        records = list(csv.DictReader(f))
    parts = {(r["method"], r["stage"], r["part"]) for r in records}
    assert parts == {
        (method, stage, part)
        for stage in ("init", "trained")
        for method, part in [
            ("margin m=2", "embedding"),
            ("margin+shared m=2", "class"),
            ("margin+shared m=2", "shared"),
            ("margin+shared m=2", "concat"),
        ]  # fmt: skip
    }
    assert len(records) == len(parts)
    for r in records:
        for column in ("map_at_r", "recall_at_1", "font_match_at_10", "font_chance"):
            assert 0 <= float(r[column]) <= 100
    assert len({r["font_chance"] for r in records}) == 1  # one test set
    summary = (results / "glyphs-shared-head-fonts.md").read_text()
    assert "| margin+shared m=2 | trained | shared | 1 |" in summary
    capsys.readouterr()
    assert fonts_bench.main(argv) == 0  # resumed: nothing left to train
    assert "method=" not in capsys.readouterr().out


def test_bad_arguments_are_usage_errors_before_any_run(fonts_bench, tmp_path, capsys):
    argv = ["--results-dir", str(tmp_path / "results"), "--data-root", str(tmp_path)]
    for bad, message in [
        (["--seeds", "-1"], "argument --seeds: must be in [0, 2**32 - 1], got -1"),
        (["--jobs", "0"], "argument --jobs: must be > 0, got 0"),
        (["--methods", "no_such_row"], "unknown methods ['no_such_row']"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            fonts_bench.main(argv + bad)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
