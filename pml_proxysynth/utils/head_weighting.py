"""Test-time weighting of the embedding heads (algorithms.md B.7), through PML's tester.

The tester is not changed: ``HeadWeighting`` wraps the embedder so that it returns
``l2norm(cat(w_cls * l2norm(e_cls), w_sh * l2norm(e_sh)))``, and ``evaluate_heads`` calls
``tester.test`` once per weighting with such a wrapper. Each call recomputes the
embeddings, so evaluating k weightings costs k forward passes over the test data.
"""

import copy
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from pytorch_metric_learning.testers.base_tester import BaseTester
from torch import nn

from .checks import check_bool, is_finite_real
from .two_head_embedder import check_embedding_sizes, split_heads

DEFAULT_WEIGHTINGS: Dict[str, Sequence[float]] = {
    "concat": (1.0, 1.0),
    "class": (1.0, 0.0),
}


class HeadWeighting(nn.Module):
    """Wraps an embedder: z = l2norm(cat(w_1 * l2norm(e_1), ..., w_k * l2norm(e_k))).

    e_i are consecutive slices of the embedder output of widths ``embedding_sizes``.
    Parts with weight 0 are left out of z (so (1, 0) gives l2norm(e_1) alone).

    Args:
        embedder: the trained embedder (None: the input is already the embedding).
        embedding_sizes: slice widths, e.g. ``TwoHeadEmbedder.embedding_sizes``.
        weights: one finite weight >= 0 per part, at least one > 0.
        normalize_parts: L2-normalise each part before weighting (the losses of a
            ``CascadedEmbeddings`` run see each slice normalised); parts of a
            ``TwoHeadEmbedder`` are unit-norm already.
    """

    def __init__(
        self,
        embedder: Optional[nn.Module],
        embedding_sizes: Sequence[int],
        weights: Sequence[float],
        normalize_parts: bool = True,
    ):
        super().__init__()
        self.embedding_sizes = check_embedding_sizes(embedding_sizes)
        weights = list(weights)
        if len(weights) != len(self.embedding_sizes):
            raise ValueError(
                f"need one weight per part ({len(self.embedding_sizes)}), got {weights}"
            )
        if not all(is_finite_real(w) and w >= 0 for w in weights) or not any(weights):
            raise ValueError(
                f"weights must be finite numbers, >= 0 and not all 0, got {weights}"
            )
        weights = [float(w) for w in weights]
        self.embedder = nn.Identity() if embedder is None else embedder
        self.weights = weights
        self.normalize_parts = check_bool("normalize_parts", normalize_parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = split_heads(self.embedder(x), self.embedding_sizes)
        weighted = [
            w * (F.normalize(e, dim=-1) if self.normalize_parts else e)
            for w, e in zip(self.weights, parts)
            if w != 0
        ]
        return F.normalize(torch.cat(weighted, dim=-1), dim=-1)

    def extra_repr(self) -> str:
        return f"embedding_sizes={self.embedding_sizes}, weights={self.weights}"


def evaluate_heads(
    tester: BaseTester,
    dataset_dict: Mapping[str, torch.utils.data.Dataset],
    epoch: int,
    trunk: nn.Module,
    embedder: nn.Module,
    weightings: Optional[Mapping[str, Sequence[float]]] = None,
    embedding_sizes: Optional[Sequence[int]] = None,
    splits_to_eval: Optional[List[Tuple[str, List[str]]]] = None,
    collate_fn: Optional[Callable] = None,
    normalize_parts: bool = True,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Runs ``tester.test`` once per weighting; returns {weighting: {split: accuracies}}.

    ``tester`` is a PML tester (e.g. ``GlobalEmbeddingSpaceTester``) with
    ``use_trunk_output=False``; accuracy keys are the tester's, e.g.
    ``"precision_at_1_level0"``. ``weightings`` defaults to ``DEFAULT_WEIGHTINGS``
    (concatenation (1, 1) and class part alone (1, 0)); ``embedding_sizes`` defaults to
    ``embedder.embedding_sizes``. The tester's ``end_of_testing_hook`` is suspended
    during these calls (it cannot tell the weightings apart) and restored afterwards.
    """
    if getattr(tester, "use_trunk_output", False):
        raise ValueError("evaluate_heads needs a tester with use_trunk_output=False")
    if embedding_sizes is None:
        embedding_sizes = getattr(embedder, "embedding_sizes", None)
        if embedding_sizes is None:
            raise ValueError(
                "pass embedding_sizes, or an embedder with an embedding_sizes attribute"
            )
    weightings = DEFAULT_WEIGHTINGS if weightings is None else weightings
    wrappers = {
        name: HeadWeighting(embedder, embedding_sizes, w, normalize_parts)
        for name, w in weightings.items()
    }
    results = {}
    hook, tester.end_of_testing_hook = tester.end_of_testing_hook, None
    try:
        for name, wrapper in wrappers.items():
            accuracies = tester.test(
                dataset_dict,
                epoch,
                trunk,
                wrapper,
                splits_to_eval=copy.deepcopy(splits_to_eval),
                collate_fn=collate_fn,
            )
            results[name] = {split: dict(acc) for split, acc in accuracies.items()}
    finally:
        tester.end_of_testing_hook = hook
    return results
