"""PML's CascadedEmbeddings trainer plus an optional loss on the whole embedding."""

from typing import Optional, Sequence

import torch
from pytorch_metric_learning.trainers import CascadedEmbeddings

from .checks import is_finite_real

DECORRELATION_KEY = "decorrelation_loss"


class DecorrelatedCascadedEmbeddings(CascadedEmbeddings):
    """``CascadedEmbeddings`` that also accepts ``loss_funcs["decorrelation_loss"]``.

    That loss (e.g. ``HeadDecorrelationLoss``) is called on the full, unsliced embedding,
    ``loss(embeddings)``, and its value is stored under ``losses["decorrelation_loss"]``
    (weighted by ``loss_weights["decorrelation_loss"]``; skipped when that weight is 0).
    Its parameters are stepped by ``optimizers["decorrelation_loss_optimizer"]``. Without
    that key, training is exactly that of ``CascadedEmbeddings``.

    As in every PML trainer, explicit ``loss_weights`` must name every loss key, this one
    included.
    """

    def __init__(self, embedding_sizes: Sequence[int], *args, **kwargs):
        super().__init__(embedding_sizes, *args, **kwargs)
        loss = self.loss_funcs.get(DECORRELATION_KEY)
        loss_sizes = getattr(loss, "embedding_sizes", None)
        if loss_sizes is not None and list(loss_sizes) != list(embedding_sizes):
            raise ValueError(
                f"{DECORRELATION_KEY} has embedding_sizes {list(loss_sizes)}, "
                f"but the trainer has {list(embedding_sizes)}"
            )
        weight = self.loss_weights.get(DECORRELATION_KEY, 0)
        if not (is_finite_real(weight) and weight >= 0):  # < 0 would skip it silently
            raise ValueError(
                f"loss_weights[{DECORRELATION_KEY!r}] must be a finite number >= 0 "
                f"(0 switches it off; its rho sets the strength), got {weight!r}"
            )
        self._embeddings: Optional[torch.Tensor] = None

    def compute_embeddings(self, data):
        embeddings = super().compute_embeddings(data)
        self._embeddings = embeddings
        return embeddings

    def calculate_loss(self, curr_batch):
        super().calculate_loss(curr_batch)
        embeddings, self._embeddings = self._embeddings, None
        if (
            DECORRELATION_KEY in self.loss_funcs
            and self.loss_weights.get(DECORRELATION_KEY, 0) > 0
        ):
            self.losses[DECORRELATION_KEY] += self.loss_funcs[DECORRELATION_KEY](
                embeddings
            )

    def modify_schema(self):
        super().modify_schema()
        self.schema["loss_funcs"].keys += [DECORRELATION_KEY]
