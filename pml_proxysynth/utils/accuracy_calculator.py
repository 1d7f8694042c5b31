"""PML's AccuracyCalculator with Recall@K, the metric deep metric learning papers report."""

import functools
from typing import Sequence, Tuple

from pytorch_metric_learning.utils import accuracy_calculator as ac

DEFAULT_RECALL_KS: Tuple[int, ...] = (1, 2, 4, 8)


def recall_metric_name(k: int) -> str:
    """The metric name of Recall@k, e.g. ``"recall_at_4"``."""
    return f"recall_at_{k}"


class RecallAtKAccuracyCalculator(ac.AccuracyCalculator):
    """``AccuracyCalculator`` that also computes ``recall_at_<K>`` for each K in ``recall_ks``.

    Recall@K is 1 for a query when at least one of its K nearest references has the
    query's label (the definition of the deep metric learning literature, not the
    information-retrieval one), averaged over queries (or per class with
    ``avg_of_avgs``). Queries whose label has no other reference are left out, as PML does
    for ``precision_at_1`` (so ``recall_at_1 == precision_at_1``).

    Args:
        recall_ks: the Ks, positive ints (default 1, 2, 4, 8).
        k: as in ``AccuracyCalculator`` (None, an int or ``"max_bin_count"``, the
            default here), but never fewer neighbours than ``max(recall_ks)`` are
            retrieved (capped at the number of references). PML's metrics that depend
            on k (``mean_average_precision``, ``mean_reciprocal_rank``) still see only
            the neighbours ``AccuracyCalculator`` itself would retrieve, so they equal
            PML's values.
        **kwargs: passed to ``AccuracyCalculator`` (``include``, ``exclude``,
            ``avg_of_avgs``, ``device``, ``knn_func``, ...). Metric names in ``include``
            and ``exclude`` may name the recall metrics.
    """

    def __init__(
        self,
        recall_ks: Sequence[int] = DEFAULT_RECALL_KS,
        k="max_bin_count",
        **kwargs,
    ):
        ks = sorted({int(x) for x in recall_ks})
        if len(ks) == 0 or any(
            isinstance(x, bool) or int(x) != x or x < 1 for x in recall_ks
        ):
            raise ValueError(f"recall_ks must be positive ints, got {recall_ks!r}")
        if isinstance(k, int) and not isinstance(k, bool) and k < ks[-1]:
            raise ValueError(
                f"k ({k}) must be at least the largest recall K ({ks[-1]})"
            )
        self.recall_ks = tuple(ks)
        self._pml_num_k = None  # the k PML would retrieve, set per call by determine_k
        # AccuracyCalculator finds metrics through dir(self): bind one method per K.
        for x in self.recall_ks:
            setattr(
                self,
                "calculate_" + recall_metric_name(x),
                functools.partial(self._recall_at_k, recall_k=x),
            )
        super().__init__(k=k, **kwargs)

    def requires_knn(self):
        return super().requires_knn() + [recall_metric_name(x) for x in self.recall_ks]

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        k = super().determine_k(
            bin_counts, num_reference_embeddings, ref_includes_query
        )
        self._pml_num_k = k
        available = num_reference_embeddings - int(ref_includes_query)
        return min(max(k, self.recall_ks[-1]), available)

    def calculate_mean_average_precision(self, knn_labels, **kwargs):
        knn_labels = knn_labels[:, : self._pml_num_k]
        return super().calculate_mean_average_precision(knn_labels, **kwargs)

    def calculate_mean_reciprocal_rank(self, knn_labels, **kwargs):
        knn_labels = knn_labels[:, : self._pml_num_k]
        return super().calculate_mean_reciprocal_rank(knn_labels, **kwargs)

    def _recall_at_k(
        self,
        knn_labels,
        query_labels,
        not_lone_query_mask,
        label_counts,
        recall_k,
        **kw,
    ):
        knn_labels, query_labels = ac.try_getting_not_lone_labels(
            knn_labels, query_labels, not_lone_query_mask
        )
        if knn_labels is None:
            return ac.nan_accuracy(label_counts[0], self.return_per_class)
        query_labels = query_labels[:, None]
        hits = self.label_comparison_fn(query_labels, knn_labels[:, :recall_k])
        if hits.ndim > 2:  # multi-dimensional labels: all components must match
            hits = hits.flatten(2).all(dim=2)
        hit = hits.any(dim=1).double()
        return ac.maybe_get_avg_of_avgs(
            hit, query_labels, self.avg_of_avgs, self.return_per_class
        )
