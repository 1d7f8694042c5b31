"""PML's MPerClassSampler for torch.distributed: one class-balanced batch across ranks."""

import contextlib
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as c_f
from torch.utils.data import Sampler

from ..utils.checks import check_int

# the draws are seeded by numpy's RandomState([seed, epoch]), whose words are uint32
_MAX_SEED_WORD = 2**32 - 1


class DistributedMPerClassSampler(Sampler[int]):
    """Splits each batch of PML's ``MPerClassSampler`` across the ranks.

    Every rank draws the same global batches of ``num_replicas * batch_size`` indices (m
    per class, from ``seed`` and the epoch only, as ``DistributedSampler`` does) and
    yields its own block of ``batch_size`` from each; ``batch_size`` is a multiple of m,
    so each class's m rows land on one rank. What PML's distributed wrappers gather is
    then one ``MPerClassSampler`` batch, as in a single process with the global batch
    size.
    Independent per-rank samplers would not give that: their classes could repeat across
    ranks, and nothing would keep their draws apart.

    Args:
        labels: the dataset's labels, one per index.
        m: rows per class in a batch.
        batch_size: rows per rank and batch (the DataLoader's batch size); a multiple of m.
        length_before_new_iter: indices per rank and epoch (rounded down to whole
            batches), as ``MPerClassSampler``'s argument of that name is per process.
        num_replicas, rank: default to the process group's world size and rank.
        seed: the draws' seed, the same on every rank; ``set_epoch`` varies them.
    """

    def __init__(
        self,
        labels: Sequence[int],
        m: int,
        batch_size: int,
        length_before_new_iter: int = 100000,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        seed: int = 0,
    ):
        if num_replicas is None or rank is None:
            if not torch.distributed.is_initialized():
                raise ValueError(
                    "num_replicas and rank are needed without an initialised process "
                    "group"
                )
            if num_replicas is None:
                num_replicas = torch.distributed.get_world_size()
            if rank is None:
                rank = torch.distributed.get_rank()
        m = check_int("m", m)
        batch_size = check_int("batch_size", batch_size)
        length_before_new_iter = check_int(
            "length_before_new_iter", length_before_new_iter
        )
        num_replicas = check_int("num_replicas", num_replicas)
        rank = check_int("rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"rank must lie in [0, {num_replicas}), got {rank}")
        seed = check_int("seed", seed, 0, _MAX_SEED_WORD)
        if batch_size % m:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of m ({m}), so that each "
                "class's rows land on one rank"
            )
        if length_before_new_iter < batch_size:
            raise ValueError(
                f"length_before_new_iter ({length_before_new_iter}) must be at least "
                f"batch_size ({batch_size})"
            )
        self.labels = np.asarray(labels)
        num_classes = len(np.unique(self.labels))
        if m * num_classes < batch_size * num_replicas:
            raise ValueError(
                f"the global batch ({num_replicas} ranks x batch_size {batch_size}) needs "
                f"{batch_size * num_replicas // m} classes of m = {m} rows, but the "
                f"labels have {num_classes} classes"
            )
        self.m, self.length_before_new_iter = m, length_before_new_iter
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.batch_size, self.epoch = batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Like ``DistributedSampler.set_epoch``: new draws for each epoch."""
        self.epoch = check_int("epoch", epoch, 0, _MAX_SEED_WORD)

    def __len__(self) -> int:
        return (
            self.length_before_new_iter - self.length_before_new_iter % self.batch_size
        )

    def __iter__(self) -> Iterator[int]:
        # a new MPerClassSampler each time: it shuffles its class list in place, so a
        # reused one would make the draws depend on how often it was iterated before
        with _numpy_random(np.random.RandomState([self.seed, self.epoch])):
            indices = torch.as_tensor(list(self._global_sampler()))
        blocks = indices.reshape(-1, self.num_replicas, self.batch_size)
        return iter(blocks[:, self.rank].reshape(-1).tolist())

    def _global_sampler(self) -> MPerClassSampler:
        """PML's sampler of the global batches (all ranks' rows)."""
        return MPerClassSampler(
            self.labels,
            m=self.m,
            batch_size=self.batch_size * self.num_replicas,
            length_before_new_iter=self.length_before_new_iter * self.num_replicas,
        )


@contextlib.contextmanager
def _numpy_random(state: np.random.RandomState) -> Iterator[None]:
    """PML's samplers draw from ``common_functions.NUMPY_RANDOM``: ``state`` for a while."""
    saved = c_f.NUMPY_RANDOM
    c_f.NUMPY_RANDOM = state
    try:
        yield
    finally:
        c_f.NUMPY_RANDOM = saved
