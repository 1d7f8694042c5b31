import math

import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils import accuracy_calculator as ac
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_proxysynth.utils.accuracy_calculator import RecallAtKAccuracyCalculator


def brute_force_recall(query, query_labels, reference, reference_labels, ks, same):
    """Recall@K by explicit loops over a full distance matrix (same: ref includes query)."""
    hits = {k: [] for k in ks}
    per_class = {k: {} for k in ks}
    for i in range(len(query)):
        candidates = [
            (torch.dist(query[i], reference[j]).item(), j)
            for j in range(len(reference))
            if not (same and j == i)
        ]
        if not any(reference_labels[j] == query_labels[i] for _, j in candidates):
            continue  # lone query: no reference shares its label
        ranked = [j for _, j in sorted(candidates)]
        for k in ks:
            hit = float(any(reference_labels[j] == query_labels[i] for j in ranked[:k]))
            hits[k].append(hit)
            per_class[k].setdefault(int(query_labels[i]), []).append(hit)
    mean = {k: sum(v) / len(v) for k, v in hits.items()}
    avg_of_avgs = {
        k: sum(sum(h) / len(h) for h in c.values()) / len(c)
        for k, c in per_class.items()
    }
    return mean, avg_of_avgs


def random_problem(seed, num_query=60, num_ref=90, num_classes=7, dim=8):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(num_query, dim, generator=g)
    reference = torch.randn(num_ref, dim, generator=g)
    query_labels = torch.randint(num_classes, (num_query,), generator=g)
    reference_labels = torch.randint(num_classes, (num_ref,), generator=g)
    return query, query_labels, reference, reference_labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("avg_of_avgs", [False, True])
def test_recall_matches_brute_force_query_in_reference(seed, avg_of_avgs):
    query, labels, _, _ = random_problem(seed)
    ks = (1, 2, 4, 8)
    calc = RecallAtKAccuracyCalculator(
        recall_ks=ks, avg_of_avgs=avg_of_avgs, device=torch.device("cpu")
    )
    result = calc.get_accuracy(query, labels)
    mean, per_class = brute_force_recall(query, labels, query, labels, ks, same=True)
    expected = per_class if avg_of_avgs else mean
    for k in ks:
        assert result[f"recall_at_{k}"] == pytest.approx(expected[k], abs=1e-9)
    assert result["recall_at_1"] == pytest.approx(result["precision_at_1"])


@pytest.mark.parametrize("seed", [3, 4])
def test_recall_matches_brute_force_separate_reference(seed):
    query, query_labels, reference, reference_labels = random_problem(seed)
    ks = (1, 3, 10)
    calc = RecallAtKAccuracyCalculator(
        recall_ks=ks,
        include=("recall_at_1", "recall_at_3", "recall_at_10"),
        device=torch.device("cpu"),
    )
    result = calc.get_accuracy(query, query_labels, reference, reference_labels)
    assert set(result) == {"recall_at_1", "recall_at_3", "recall_at_10"}
    mean, _ = brute_force_recall(
        query, query_labels, reference, reference_labels, ks, same=False
    )
    for k in ks:
        assert result[f"recall_at_{k}"] == pytest.approx(mean[k], abs=1e-9)


def test_recall_is_monotone_and_k_covers_largest_recall():
    # 2 samples per class: "max_bin_count" alone would retrieve a single neighbour.
    g = torch.Generator().manual_seed(5)
    embeddings = torch.randn(40, 4, generator=g)
    labels = torch.arange(20).repeat_interleave(2)
    calc = RecallAtKAccuracyCalculator(device=torch.device("cpu"))
    result = calc.get_accuracy(embeddings, labels)
    values = [result[f"recall_at_{k}"] for k in (1, 2, 4, 8)]
    assert values == sorted(values)
    mean, _ = brute_force_recall(
        embeddings, labels, embeddings, labels, (1, 2, 4, 8), same=True
    )
    assert values == pytest.approx([mean[k] for k in (1, 2, 4, 8)])


def test_default_metrics_kept_next_to_recall():
    calc = RecallAtKAccuracyCalculator(exclude=("AMI",), device=torch.device("cpu"))
    metrics = set(calc.get_curr_metrics())
    assert {"recall_at_1", "recall_at_8", "mean_average_precision_at_r"} <= metrics
    assert {"r_precision", "NMI"} <= metrics


def test_lone_queries_give_nan_and_perfect_embeddings_give_one():
    labels = torch.tensor([0, 1, 2])
    calc = RecallAtKAccuracyCalculator(
        recall_ks=(1,), include=("recall_at_1",), device=torch.device("cpu")
    )
    assert math.isnan(calc.get_accuracy(torch.eye(3), labels)["recall_at_1"])
    embeddings = torch.tensor([[1.0, 0], [0.99, 0.01], [0, 1.0], [0.01, 0.99]])
    labels = torch.tensor([0, 0, 1, 1])
    assert calc.get_accuracy(embeddings, labels)["recall_at_1"] == 1.0


@pytest.mark.parametrize("bad", [(), (0,), (1, -2), (1.5,)])
def test_bad_recall_ks(bad):
    with pytest.raises(ValueError, match="recall_ks"):
        RecallAtKAccuracyCalculator(recall_ks=bad)


def test_k_smaller_than_largest_recall_rejected():
    with pytest.raises(ValueError, match="largest recall K"):
        RecallAtKAccuracyCalculator(recall_ks=(1, 8), k=4)


def test_k_equal_to_largest_recall_accepted():
    query, labels, _, _ = random_problem(6)
    ks = (1, 8)
    calc = RecallAtKAccuracyCalculator(
        recall_ks=ks,
        k=8,
        include=("recall_at_1", "recall_at_8"),
        device=torch.device("cpu"),
    )
    result = calc.get_accuracy(query, labels)
    mean, _ = brute_force_recall(query, labels, query, labels, ks, same=True)
    for k in ks:
        assert result[f"recall_at_{k}"] == pytest.approx(mean[k], abs=1e-9)


@pytest.mark.parametrize("num_rows", [5, 6])
def test_fewer_references_than_largest_recall_k(num_rows):
    """Recall@8 on a set of 5 or 6 rows: a query (in the reference set) has only
    num_rows - 1 neighbours, all of which count."""
    g = torch.Generator().manual_seed(7)
    embeddings = torch.randn(num_rows, 3, generator=g)
    labels = torch.arange(num_rows) % 2
    ks = (1, 2, 8)
    calc = RecallAtKAccuracyCalculator(
        recall_ks=ks,
        include=tuple(f"recall_at_{k}" for k in ks),
        device=torch.device("cpu"),
    )
    result = calc.get_accuracy(embeddings, labels)
    mean, _ = brute_force_recall(embeddings, labels, embeddings, labels, ks, same=True)
    for k in ks:
        assert result[f"recall_at_{k}"] == pytest.approx(mean[k], abs=1e-9)
    assert result["recall_at_8"] == 1.0
    # a knn_func that cannot pad missing neighbours (PML's CustomKNN: torch.topk) gets
    # no more than the references there are
    calc = RecallAtKAccuracyCalculator(
        recall_ks=ks,
        include=tuple(f"recall_at_{k}" for k in ks),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
        device=torch.device("cpu"),
    )
    result = calc.get_accuracy(embeddings, labels)
    for k in ks:
        assert result[f"recall_at_{k}"] == pytest.approx(mean[k], abs=1e-9)


@pytest.mark.parametrize("k", ["max_bin_count", None, 9])
@pytest.mark.parametrize("same", [True, False])
def test_k_dependent_pml_metrics_equal_pml(k, same):
    """Retrieving max(recall_ks) neighbours must not change PML's own metrics: with
    classes of 3, "max_bin_count" alone retrieves 2 or 3 neighbours, not 8."""
    g = torch.Generator().manual_seed(8)
    query = torch.randn(60, 4, generator=g)
    labels = torch.arange(20).repeat_interleave(3)
    reference, reference_labels = (query, labels) if same else (query + 0.1, labels)
    metrics = (
        "mean_average_precision",
        "mean_reciprocal_rank",
        "mean_average_precision_at_r",
        "r_precision",
        "precision_at_1",
    )
    ours = RecallAtKAccuracyCalculator(k=k, include=metrics, device=torch.device("cpu"))
    pml = ac.AccuracyCalculator(k=k, include=metrics, device=torch.device("cpu"))
    args = (query, labels) if same else (query, labels, reference, reference_labels)
    expected = pml.get_accuracy(*args)
    assert ours.get_accuracy(*args) == pytest.approx(expected, abs=1e-12)
