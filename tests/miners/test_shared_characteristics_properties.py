"""Property-based tests (hypothesis) of SharedCharacteristicsMiner: random batch sizes,
class counts, label compositions and strategies; the triplets always meet the class
constraint of their strategy and index valid rows."""

import unittest

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_proxysynth.miners import SharedCharacteristicsMiner

from .. import TEST_DEVICE


@st.composite
def batches(draw):
    num_classes = draw(st.integers(1, 12))
    batch_size = draw(st.integers(1, 40))
    composition = draw(st.sampled_from(("one_class", "all_distinct", "random")))
    if composition == "one_class":
        labels = [0] * batch_size
    elif composition == "all_distinct":
        labels = list(range(batch_size))
    else:
        labels = draw(
            st.lists(
                st.integers(0, num_classes - 1),
                min_size=batch_size,
                max_size=batch_size,
            )
        )
    return torch.tensor(labels, dtype=torch.long)


class TestProperties(unittest.TestCase):
    @settings(max_examples=150, deadline=None)
    @given(
        batches(),
        st.sampled_from(("standard", "full", "random")),
        st.integers(1, 3),
        st.floats(0.0, 1.4),
        st.integers(0, 2**31 - 1),
    )
    def test_triplets_meet_their_constraint(
        self, labels, strategy, per_anchor, cutoff, seed
    ):
        torch.manual_seed(seed)
        labels = labels.to(TEST_DEVICE)
        emb = torch.randn(len(labels), 6, device=TEST_DEVICE)
        miner = SharedCharacteristicsMiner(
            strategy=strategy, cutoff=cutoff, triplets_per_anchor=per_anchor
        )
        a, p, n = miner(emb, labels)
        self.assertEqual(len(a), len(p))
        self.assertEqual(len(a), len(n))
        self.assertLessEqual(len(a), per_anchor * len(labels))
        for idx in (a, p, n):
            self.assertTrue(bool(((idx >= 0) & (idx < len(labels))).all()))
        self.assertTrue(bool((a != p).all()))
        if strategy != "random":
            ya, yp, yn = labels[a], labels[p], labels[n]
            self.assertTrue(bool(((ya != yp) & (ya != yn) & (yp != yn)).all()))
            if len(torch.unique(labels)) < 3:
                self.assertEqual(len(a), 0)
