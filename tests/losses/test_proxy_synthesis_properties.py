"""Property-based tests (hypothesis): random batch sizes, class counts, label compositions,
mu and alpha; every draw must give a finite loss, unique synthetic labels >= C, pairs of
different classes and an unchanged inner loss."""

import unittest

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_proxysynth.losses import ProxySynthesisLoss

from .. import TEST_DEVICE
from .test_proxy_synthesis_loss import (
    EMBEDDING_SIZE,
    assert_same_state,
    build_losses,
    inner_state,
)

LOSS_NAMES = sorted(build_losses(2))
COMPOSITIONS = ("one_class", "two_classes", "all_distinct", "random")


@st.composite
def batches(draw):
    """(loss name, C, labels, mu, alpha, pairing-safe flag) with a chosen composition."""
    composition = draw(st.sampled_from(COMPOSITIONS))
    num_classes = draw(st.integers(2, 24))
    batch_size = draw(st.integers(1, 24))
    if composition == "all_distinct":
        batch_size = min(batch_size, num_classes)
        labels = draw(st.permutations(range(num_classes)))[:batch_size]
    elif composition == "one_class":
        labels = [draw(st.integers(0, num_classes - 1))] * batch_size
    elif composition == "two_classes":
        a, b = draw(
            st.lists(
                st.integers(0, num_classes - 1), min_size=2, max_size=2, unique=True
            )
        )
        labels = draw(st.lists(st.sampled_from((a, b)), min_size=batch_size))
        labels = labels[:batch_size]
    else:
        labels = draw(
            st.lists(
                st.integers(0, num_classes - 1),
                min_size=batch_size,
                max_size=batch_size,
            )
        )
    return (
        draw(st.sampled_from(LOSS_NAMES)),
        num_classes,
        torch.tensor(labels, dtype=torch.long),
        draw(st.floats(0.0, 3.0)),
        draw(st.floats(0.05, 5.0)),
        draw(st.sampled_from(("batch", "pair"))),
    )


class TestProperties(unittest.TestCase):
    @settings(max_examples=150, deadline=None)
    @given(batches(), st.integers(0, 2**31 - 1))
    def test_every_draw(self, batch, seed):
        name, num_classes, labels, mu, alpha, lam_per = batch
        torch.manual_seed(seed)
        inner = build_losses(num_classes)[name].to(TEST_DEVICE)
        before = inner_state(inner)
        wrapper = ProxySynthesisLoss(inner, alpha=alpha, mu=mu, lam_per=lam_per)
        labels = labels.to(TEST_DEVICE)
        emb = torch.randn(len(labels), EMBEDDING_SIZE, device=TEST_DEVICE)
        emb.requires_grad_(True)

        syn = wrapper.synthesize(emb, labels)
        num_syn = wrapper.num_synthetic_for(labels)
        self.assertEqual(len(syn.pairs), num_syn)
        syn_labels = syn.labels[len(labels) :]
        self.assertEqual(len(torch.unique(syn_labels)), num_syn)
        self.assertTrue(bool((syn_labels >= num_classes).all()))
        if num_syn:
            pair_labels = labels[syn.pairs]
            self.assertTrue(bool((pair_labels[:, 0] != pair_labels[:, 1]).all()))
        if len(torch.unique(labels)) < 2:
            self.assertEqual(num_syn, 0)

        loss = wrapper(emb, labels)
        self.assertTrue(bool(torch.isfinite(loss)), loss)
        loss.backward()
        self.assertTrue(bool(torch.isfinite(emb.grad).all()))

        assert_same_state(self, before, inner_state(inner))
