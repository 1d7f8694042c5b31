"""Adversarial decorrelation of two embedding heads (DiVA / MIC style, algorithms.md B.6)."""

import numbers
from collections import OrderedDict
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords
from torch import nn

from .checks import check_int, is_finite_real
from .two_head_embedder import check_embedding_sizes, split_heads

PART_NAMES = ("class", "shared")


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by -1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return -grad_output


def gradient_reversal(x: torch.Tensor) -> torch.Tensor:
    """Applies ``GradientReversal`` to ``x``."""
    return GradientReversal.apply(x)


def _part_index(part: Union[str, int]) -> int:
    if isinstance(part, str):
        if part not in PART_NAMES:
            raise ValueError(
                f"direction entries must be one of {PART_NAMES}, got {part!r}"
            )
        return PART_NAMES.index(part)
    if (
        isinstance(part, bool)
        or not isinstance(part, numbers.Integral)
        or part not in (0, 1)
    ):
        raise ValueError(
            f"direction entries must be 'class', 'shared', 0 or 1, got {part!r}"
        )
    return part


class HeadDecorrelationLoss(ModuleWithRecords):
    """Adversarial decorrelation of the two parts of a [class, shared] embedding.

    With s = l2norm(GRL(e_source)), t = l2norm(GRL(e_target)) and a regressor
    r = Linear(d_source, hidden) -> ReLU -> Linear(hidden, d_target):

        L_dec = -rho * mean_batch(mean_dims((t * l2norm(r(s)))^2))

    Minimising L_dec trains r to predict the target part from the source part; the
    gradient reversal (GRL) hands both encoders the opposite gradient, which pushes the
    parts apart. The regressor's parameters need an optimizer
    (``decorrelation_loss_optimizer`` under ``DecorrelatedCascadedEmbeddings``).

    Args:
        embedding_sizes: [class_size, shared_size], the widths of the two parts of the
            embedding this loss is called on (class part first, as ``TwoHeadEmbedder``).
        rho: weight of the term (DiVA default 1500; 0 gives a zero loss).
        hidden: width of the regressor's hidden layer.
        direction: (source, target), each "class"/"shared" or 0/1; the regressor
            predicts the target part from the source part.
    """

    def __init__(
        self,
        embedding_sizes: Sequence[int],
        rho: float = 1500.0,
        hidden: int = 512,
        direction: Tuple[Union[str, int], Union[str, int]] = ("shared", "class"),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.embedding_sizes = check_embedding_sizes(embedding_sizes)
        if len(self.embedding_sizes) != 2:
            raise ValueError(
                f"embedding_sizes must have 2 entries (class, shared), got {self.embedding_sizes}"
            )
        if not (is_finite_real(rho) and rho >= 0):
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        hidden = check_int("hidden", hidden)
        # a sequence: a set's order (which head predicts which) would vary by run
        if not isinstance(direction, (tuple, list)) or len(direction) != 2:
            raise ValueError(f"direction must be (source, target), got {direction!r}")
        self.source, self.target = (_part_index(p) for p in direction)
        if self.source == self.target:
            raise ValueError(f"direction needs two different parts, got {direction!r}")
        self.rho = float(rho)
        self.hidden = hidden
        # named children: record-keeper turns child names into SQLite table names,
        # which must not start with a digit ("0_Linear" fails)
        self.regressor = nn.Sequential(
            OrderedDict(
                hidden=nn.Linear(self.embedding_sizes[self.source], hidden),
                relu=nn.ReLU(),
                output=nn.Linear(hidden, self.embedding_sizes[self.target]),
            )
        )
        self.add_to_recordable_attributes(list_of_names=["rho"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=["correlation"], is_stat=True)

    @property
    def direction(self) -> Tuple[str, str]:
        """(source, target) part names."""
        return PART_NAMES[self.source], PART_NAMES[self.target]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings: [B, class_size + shared_size]; returns the scalar L_dec."""
        self.reset_stats()
        parts = split_heads(embeddings, self.embedding_sizes)
        s = F.normalize(gradient_reversal(parts[self.source]), dim=-1)
        t = F.normalize(gradient_reversal(parts[self.target]), dim=-1)
        # in the regressor's dtype: float64 or float16 embeddings outside autocast
        # would not multiply with its float32 weights
        s = s.to(self.regressor.hidden.weight.dtype)
        prediction = F.normalize(self.regressor(s), dim=-1)
        products = (t * prediction).pow(2)
        # an empty batch gives 0 (as PML's losses do), not the NaN of an empty mean
        correlation = products.mean() if products.numel() > 0 else products.sum()
        if self.collect_stats:
            self.correlation = correlation.item()
        return -self.rho * correlation

    def extra_repr(self) -> str:
        return f"rho={self.rho}, direction={self.direction}"
