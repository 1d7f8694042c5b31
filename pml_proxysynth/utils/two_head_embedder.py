"""Two-head embedder (Sharing Matters / DiVA): a class head and a shared head."""

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_bool, check_int


def check_embedding_sizes(embedding_sizes: Sequence[int]) -> List[int]:
    """Validates a sequence of positive slice widths and returns it as a list."""
    sizes = list(embedding_sizes)
    if len(sizes) == 0:
        raise ValueError("embedding_sizes must not be empty")
    return [check_int(f"embedding_sizes[{i}]", x) for i, x in enumerate(sizes)]


def split_heads(
    embeddings: torch.Tensor, embedding_sizes: Sequence[int]
) -> Tuple[torch.Tensor, ...]:
    """Cuts [..., sum(sizes)] embeddings into consecutive parts, as CascadedEmbeddings does."""
    sizes = check_embedding_sizes(embedding_sizes)
    if embeddings.shape[-1] != sum(sizes):
        raise ValueError(
            f"embeddings have width {embeddings.shape[-1]}, but embedding_sizes "
            f"{sizes} add up to {sum(sizes)}"
        )
    return tuple(torch.split(embeddings, sizes, dim=-1))


class TwoHeadEmbedder(nn.Module):
    """Maps trunk features h to ``cat(l2norm(W_cls h), l2norm(W_sh h))``.

    The class part comes first, then the shared part, so ``embedding_sizes``
    ([class_size, shared_size]) can be passed to PML's ``CascadedEmbeddings``: slice 0
    gets the class loss, slice 1 the shared loss.

    Args:
        in_features: width D of the trunk output [B, D].
        class_size: width of the class-discriminative head.
        shared_size: width of the shared-characteristics head.
        bias: whether the two linear heads have a bias.
    """

    def __init__(
        self,
        in_features: int,
        class_size: int = 128,
        shared_size: int = 128,
        bias: bool = True,
    ):
        super().__init__()
        in_features = check_int("in_features", in_features)
        class_size = check_int("class_size", class_size)
        shared_size = check_int("shared_size", shared_size)
        self.in_features = in_features
        self.class_size = class_size
        self.shared_size = shared_size
        bias = check_bool("bias", bias)
        self.class_head = nn.Linear(in_features, class_size, bias=bias)
        self.shared_head = nn.Linear(in_features, shared_size, bias=bias)

    @property
    def embedding_sizes(self) -> List[int]:
        """[class_size, shared_size], the slice widths for ``CascadedEmbeddings``."""
        return [self.class_size, self.shared_size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_features] -> [B, class_size + shared_size], each part unit-norm."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected trunk features of width {self.in_features}, got {x.shape[-1]}"
            )
        e_cls = F.normalize(self.class_head(x), dim=-1)
        e_sh = F.normalize(self.shared_head(x), dim=-1)
        return torch.cat([e_cls, e_sh], dim=-1)

    def split(self, embeddings: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (class part, shared part) of this embedder's output."""
        e_cls, e_sh = split_heads(embeddings, self.embedding_sizes)
        return e_cls, e_sh

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, class_size={self.class_size}, "
            f"shared_size={self.shared_size}"
        )
