"""DistributedMPerClassSampler: the ranks' blocks of each batch form one class-balanced
batch (m rows per class, each class on one rank), the same on every rank's sampler, new
after set_epoch; PML's numpy RNG is left as it was."""

import unittest
from collections import Counter
from unittest import mock

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f

from pml_proxysynth.samplers import DistributedMPerClassSampler

WORLD_SIZE, M, BATCH_SIZE, LENGTH = 3, 2, 4, 24  # BATCH_SIZE rows per rank


def make_labels(num_classes=10, rows_per_class=(1, 2, 5)):
    """Classes of 1, 2 and 5 rows (a class with fewer than M rows is drawn with
    replacement, as by PML's sampler)."""
    sizes = [rows_per_class[c % len(rows_per_class)] for c in range(num_classes)]
    return np.repeat(np.arange(num_classes), sizes)


def rank_samplers(labels, seed=0):
    return [
        DistributedMPerClassSampler(
            labels, M, BATCH_SIZE, LENGTH, num_replicas=WORLD_SIZE, rank=r, seed=seed
        )
        for r in range(WORLD_SIZE)
    ]


def batches(sampler):
    """The sampler's indices cut into per-rank batches."""
    indices = list(sampler)
    return [indices[i : i + BATCH_SIZE] for i in range(0, len(indices), BATCH_SIZE)]


class TestDistributedMPerClassSampler(unittest.TestCase):
    def test_ranks_blocks_form_one_class_balanced_batch(self):
        labels = make_labels()
        per_rank = [batches(s) for s in rank_samplers(labels)]
        self.assertEqual(
            [len(b) for b in per_rank], [LENGTH // BATCH_SIZE] * WORLD_SIZE
        )
        for step in zip(*per_rank):
            rank_classes = [set(labels[block]) for block in step]
            counts = Counter(labels[np.concatenate(step)])
            # m rows of each class, WORLD_SIZE * BATCH_SIZE / M distinct classes ...
            self.assertEqual(set(counts.values()), {M})
            self.assertEqual(len(counts), WORLD_SIZE * BATCH_SIZE // M)
            # ... and no class split over two ranks
            self.assertEqual(sum(len(c) for c in rank_classes), len(counts))

    def test_labels_in_dataset_order(self):
        """Labels not sorted by class (a shuffled dataset): the ranks' blocks still form
        one class-balanced batch, indexed into the dataset as it is."""
        labels = np.random.RandomState(0).permutation(make_labels())
        per_rank = [batches(s) for s in rank_samplers(labels)]
        for step in zip(*per_rank):
            counts = Counter(labels[np.concatenate(step)])
            self.assertEqual(set(counts.values()), {M})
            rank_classes = [set(labels[block]) for block in step]
            self.assertEqual(sum(len(c) for c in rank_classes), len(counts))

    def test_same_draws_on_every_rank_object_new_ones_per_epoch(self):
        labels = make_labels()
        first = [list(s) for s in rank_samplers(labels)]
        self.assertEqual(first, [list(s) for s in rank_samplers(labels)])
        self.assertNotEqual(first, [list(s) for s in rank_samplers(labels, seed=1)])
        moved = rank_samplers(labels)
        for s in moved:
            s.set_epoch(1)
        self.assertNotEqual(first, [list(s) for s in moved])
        # seeded by the pair (seed, epoch), not their sum: (1, 0) differs from (0, 1)
        self.assertNotEqual(
            [list(s) for s in moved], [list(s) for s in rank_samplers(labels, seed=1)]
        )

    def test_draws_depend_on_seed_and_epoch_only(self):
        """An epoch's draws do not depend on earlier iterations (a resumed run draws
        what an uninterrupted one does, and an extra pass on one rank cannot put the
        ranks out of step)."""
        labels = make_labels()
        fresh = rank_samplers(labels)[0]
        fresh.set_epoch(1)
        used = rank_samplers(labels)[0]
        list(used)
        used.set_epoch(1)
        list(used)
        self.assertEqual(list(fresh), list(used))

    def test_len_and_pml_rng_untouched(self):
        saved = c_f.NUMPY_RANDOM
        state = np.random.get_state()[1].copy()
        sampler = rank_samplers(make_labels())[1]
        self.assertEqual(len(sampler), LENGTH)
        self.assertEqual(len(list(sampler)), LENGTH)
        self.assertIs(c_f.NUMPY_RANDOM, saved)
        np.testing.assert_array_equal(np.random.get_state()[1], state)

    def test_len_rounds_down_to_whole_batches(self):
        """length_before_new_iter counts indices per rank, rounded down to whole
        batches of BATCH_SIZE: len() is what iteration yields."""
        labels = make_labels()
        for length in (BATCH_SIZE, LENGTH + 1, LENGTH + BATCH_SIZE - 1):
            expected = (length // BATCH_SIZE) * BATCH_SIZE
            for rank in range(WORLD_SIZE):
                with self.subTest(length=length, rank=rank):
                    sampler = DistributedMPerClassSampler(
                        labels, M, BATCH_SIZE, length, num_replicas=WORLD_SIZE,
                        rank=rank,
                    )  # fmt: skip
                    self.assertEqual(len(sampler), expected)
                    self.assertEqual(len(list(sampler)), expected)

    def test_exactly_enough_classes(self):
        """A global batch of m rows of every class is allowed, and then holds them all."""
        labels = make_labels(num_classes=WORLD_SIZE * BATCH_SIZE // M)
        per_rank = [
            batches(
                DistributedMPerClassSampler(
                    labels, M, BATCH_SIZE, LENGTH, num_replicas=WORLD_SIZE, rank=r
                )
            )
            for r in range(WORLD_SIZE)
        ]
        for step in zip(*per_rank):
            counts = Counter(labels[np.concatenate(step)])
            self.assertEqual(set(counts), set(labels))
            self.assertEqual(set(counts.values()), {M})

    def test_process_group_fills_in_only_what_is_missing(self):
        """As DistributedSampler: an explicit num_replicas or rank is kept, the other one
        comes from the process group (here a mocked group of 2, this process rank 1)."""
        labels = make_labels()
        with (
            mock.patch.object(torch.distributed, "is_initialized", return_value=True),
            mock.patch.object(torch.distributed, "get_world_size", return_value=2),
            mock.patch.object(torch.distributed, "get_rank", return_value=1),
        ):
            cases = [
                (dict(), (2, 1)),
                (dict(num_replicas=WORLD_SIZE), (WORLD_SIZE, 1)),
                (dict(rank=0), (2, 0)),
                (dict(num_replicas=WORLD_SIZE, rank=2), (WORLD_SIZE, 2)),
            ]
            for given, expected in cases:
                with self.subTest(given=given):
                    sampler = DistributedMPerClassSampler(
                        labels, M, BATCH_SIZE, LENGTH, **given
                    )
                    self.assertEqual((sampler.num_replicas, sampler.rank), expected)

    def test_set_epoch_takes_a_seed_word(self):
        sampler = DistributedMPerClassSampler(
            make_labels(), M, BATCH_SIZE, LENGTH, num_replicas=WORLD_SIZE, rank=0
        )
        sampler.set_epoch(np.int64(2**32 - 1))
        self.assertEqual(len(list(sampler)), len(sampler))
        for epoch in (-1, 2**32, 1.0, None):
            with self.subTest(epoch=epoch):
                with self.assertRaisesRegex(
                    ValueError, r"epoch must be an int in \[0, "
                ):
                    sampler.set_epoch(epoch)

    def test_numpy_integer_arguments(self):
        sampler = DistributedMPerClassSampler(
            make_labels(), np.int64(M), np.int32(BATCH_SIZE), np.int64(LENGTH),
            num_replicas=np.int64(WORLD_SIZE), rank=0,
        )  # fmt: skip
        self.assertEqual(
            (sampler.m, sampler.batch_size, sampler.num_replicas),
            (M, BATCH_SIZE, WORLD_SIZE),
        )

    def test_bad_arguments(self):
        labels = make_labels()
        cases = [
            (dict(batch_size=5), "multiple of m"),
            (dict(length_before_new_iter=2), "at least batch_size"),
            (dict(rank=3), r"rank must lie in \[0, 3\)"),
            (dict(rank=-1), "rank must be an int >= 0, got -1"),
            (dict(m=0), "m must be an int >= 1"),
            (dict(batch_size=0), "batch_size must be an int >= 1"),
            (
                dict(length_before_new_iter=96.0),
                "length_before_new_iter must be an int",
            ),
            (dict(num_replicas=0), "num_replicas must be an int >= 1"),
            (dict(num_replicas=2.0), "num_replicas must be an int >= 1, got 2.0"),
            (dict(rank=1.0), "rank must be an int >= 0, got 1.0"),
            (dict(rank=True), "rank must be an int >= 0, got True"),
            (dict(seed=-1), r"seed must be an int in \[0, 4294967295\], got -1"),
            (dict(seed="3"), r"seed must be an int in \[0, 4294967295\], got '3'"),
            (
                dict(seed=2**32),
                r"seed must be an int in \[0, 4294967295\], got 4294967296",
            ),
            # 10 classes of m = 2 rows fill a global batch of 20 at most, not 3 x 8
            (dict(batch_size=8), r"3 ranks x batch_size 8\) needs 12 classes"),
            (dict(num_replicas=None), "process group"),
        ]
        for change, message in cases:
            kwargs = dict(
                m=M,
                batch_size=BATCH_SIZE,
                length_before_new_iter=LENGTH,
                num_replicas=WORLD_SIZE,
                rank=0,
            )
            kwargs.update(change)
            with self.subTest(change=change):
                with self.assertRaisesRegex(ValueError, message):
                    DistributedMPerClassSampler(labels, **kwargs)


if __name__ == "__main__":
    unittest.main()
