import contextlib
import copy
import functools
import itertools
import math
import unittest
import warnings
from unittest import mock

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, reducers, regularizers, samplers, trainers
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils import distributed

from pml_proxysynth.losses import ProxySynthesisLoss
from pml_proxysynth.losses.proxy_specs import PROXY_SPECS, find_proxy_spec
from pml_proxysynth.losses.proxy_synthesis_loss import LAMBDA_MODES, _WithoutPairs

from .. import TEST_DEVICE, TEST_DTYPES

NUM_CLASSES, EMBEDDING_SIZE, BATCH_SIZE = 10, 8, 12


def build_losses(num_classes, embedding_size=EMBEDDING_SIZE, **kwargs):
    """One instance of every supported loss, keyed by name; ``kwargs`` go to every
    constructor (P2SGradLoss, which has no weight regularizer, gets no
    ``weight_*`` ones)."""
    c, d = num_classes, embedding_size
    no_weight = {k: v for k, v in kwargs.items() if not k.startswith("weight_")}
    return {
        "ProxyAnchorLoss": losses.ProxyAnchorLoss(c, d, **kwargs),
        "ProxyNCALoss": losses.ProxyNCALoss(c, d, softmax_scale=3, **kwargs),
        # a distance that does not normalise: the wrapper must normalise the proxies
        "ProxyNCALoss unnormalised": losses.ProxyNCALoss(
            c, d, distance=LpDistance(normalize_embeddings=False), **kwargs
        ),
        "NormalizedSoftmaxLoss": losses.NormalizedSoftmaxLoss(c, d, **kwargs),
        "SoftTripleLoss": losses.SoftTripleLoss(c, d, centers_per_class=3, **kwargs),
        "LargeMarginSoftmaxLoss": losses.LargeMarginSoftmaxLoss(c, d, **kwargs),
        "ArcFaceLoss": losses.ArcFaceLoss(c, d, **kwargs),
        "CosFaceLoss": losses.CosFaceLoss(c, d, **kwargs),
        "SphereFaceLoss": losses.SphereFaceLoss(c, d, **kwargs),
        "SubCenterArcFaceLoss": losses.SubCenterArcFaceLoss(
            num_classes=c, embedding_size=d, sub_centers=2, **kwargs
        ),
        "P2SGradLoss": losses.P2SGradLoss(d, c, **no_weight),
    }


def proxy_rows(loss):
    """The [C*k, D] proxies that a PML loss passes its weight regularizer, by hand."""
    if isinstance(loss, (losses.ProxyAnchorLoss, losses.ProxyNCALoss)):
        return loss.proxies
    if isinstance(loss, losses.SoftTripleLoss):
        return loss.fc.t()
    return loss.W.t()


def copy_proxies_into(loss, proxies):
    """Writes [C, D] or [C, k, D] class proxies into a fresh loss, layout by hand."""
    rows = proxies.reshape(-1, proxies.shape[-1]).detach().clone()
    if isinstance(loss, (losses.ProxyAnchorLoss, losses.ProxyNCALoss)):
        loss.proxies.data = rows
    elif isinstance(loss, losses.SoftTripleLoss):
        loss.fc.data = rows.t().contiguous()
    elif isinstance(loss, losses.P2SGradLoss):
        loss.weight.data = rows.t().contiguous()
    else:  # NormalizedSoftmax and the large-margin family store W as [D, C*k]
        loss.W.data = rows.t().contiguous()


def labels_with_distinct_neighbours(batch_size, num_classes, generator):
    """Labels whose cyclically adjacent entries differ (the official precondition)."""
    while True:
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        if (labels != labels.roll(1)).all():
            return labels


def official_proxy_synthesis_loss(emb, proxies, labels, lam, mu, logits_fn):
    """The official algorithm (algorithms.md A.2), written directly: roll-by-one pairs,
    one lam, first floor(B*mu) synthetic rows, each its own class, cross-entropy."""
    batch_size, num_classes = emb.shape[0], proxies.shape[0]
    x, p = F.normalize(emb, dim=1), F.normalize(proxies, dim=1)
    x_syn = lam * x + (1 - lam) * torch.roll(x, shifts=1, dims=0)
    p_syn = lam * p[labels] + (1 - lam) * torch.roll(p[labels], shifts=1, dims=0)
    m = min(int(batch_size * mu), batch_size)
    syn_labels = torch.arange(num_classes, num_classes + batch_size, device=emb.device)
    all_x = F.normalize(torch.cat([x, x_syn[:m]]), dim=1)
    all_p = F.normalize(torch.cat([p, p_syn[:m]]), dim=1)
    all_y = torch.cat([labels, syn_labels[:m]])
    return F.cross_entropy(logits_fn(all_x, all_p), all_y)


def official_norm_softmax(scale):
    return lambda x, p: scale * x @ p.t()


def official_proxy_nca(scale):
    return lambda x, p: -scale * torch.cdist(x, p) ** 2


def synthesis_and_loss(wrapper, emb, labels, seed=1):
    """``wrapper.synthesize`` and ``wrapper(...)`` from the same RNG state, so that the
    loss is the inner loss on exactly that synthesis."""
    torch.manual_seed(seed)
    syn = wrapper.synthesize(emb, labels)
    torch.manual_seed(seed)
    return syn, wrapper(emb, labels)


def rtol_for(dtype):
    return {torch.float16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]


class TestAgainstOfficialAlgorithm(unittest.TestCase):
    def test_norm_softmax_and_proxy_nca(self):
        scale = 12.0
        cases = {
            "NormalizedSoftmax": (
                lambda c, d: losses.NormalizedSoftmaxLoss(c, d, temperature=1 / scale),
                lambda loss: loss.W.t(),
                official_norm_softmax(scale),
            ),
            "ProxyNCA": (
                lambda c, d: losses.ProxyNCALoss(c, d, softmax_scale=scale),
                lambda loss: loss.proxies,
                official_proxy_nca(scale),
            ),
        }
        for dtype in TEST_DTYPES:
            if dtype == torch.float16:
                continue  # the 1e-5 / 1e-10 tolerances are for float32 / float64
            for name, (build, proxies_of, logits_fn) in cases.items():
                # mu 0.25: fewer parents (2M) than classes, so a loss that normalises
                # its own proxies gets the parents' normalised rather than all C
                for mu in (0.25, 0.5, 1.0):
                    with self.subTest(dtype=dtype, loss=name, mu=mu):
                        gen = torch.Generator().manual_seed(3)
                        labels = labels_with_distinct_neighbours(
                            BATCH_SIZE, NUM_CLASSES, gen
                        ).to(TEST_DEVICE)
                        emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, generator=gen)
                        emb = emb.to(TEST_DEVICE, dtype)
                        inner = build(NUM_CLASSES, EMBEDDING_SIZE).to(
                            TEST_DEVICE, dtype
                        )
                        wrapper = ProxySynthesisLoss(inner, mu=mu, pairing="roll")
                        torch.manual_seed(5)
                        lam = wrapper.synthesize(emb, labels).lam
                        torch.manual_seed(5)
                        loss = wrapper(emb, labels)
                        expected = official_proxy_synthesis_loss(
                            emb, proxies_of(inner), labels, lam, mu, logits_fn
                        )
                        rtol = rtol_for(dtype)
                        self.assertTrue(
                            torch.isclose(loss, expected, rtol=rtol, atol=rtol),
                            (loss.item(), expected.item()),
                        )


class TestEveryLossAgainstFreshInstance(unittest.TestCase):
    def test_equals_fresh_loss_over_enlarged_set(self):
        for dtype in TEST_DTYPES:
            for name in build_losses(NUM_CLASSES):
                for mu, lam_per in ((1.0, "batch"), (2.5, "pair"), (0.25, "batch")):
                    with self.subTest(dtype=dtype, loss=name, mu=mu, lam_per=lam_per):
                        torch.manual_seed(0)
                        inner = build_losses(NUM_CLASSES)[name].to(TEST_DEVICE)
                        wrapper = ProxySynthesisLoss(inner, mu=mu, lam_per=lam_per)
                        emb = torch.randn(
                            BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE
                        )
                        emb = emb.to(dtype)
                        labels = torch.randint(0, 4, (BATCH_SIZE,), device=TEST_DEVICE)
                        syn, loss = synthesis_and_loss(wrapper, emb, labels)

                        num_syn = round(mu * BATCH_SIZE)
                        self.assertEqual(syn.pairs.shape, (num_syn, 2))
                        self.assertEqual(syn.embeddings.shape[0], BATCH_SIZE + num_syn)
                        self.assertEqual(syn.proxies.shape[0], NUM_CLASSES + num_syn)

                        fresh = build_losses(NUM_CLASSES + num_syn)[name].to(
                            TEST_DEVICE
                        )
                        copy_proxies_into(fresh, syn.proxies)
                        expected = fresh(syn.embeddings.detach(), syn.labels)
                        rtol = 1e-2 if dtype == torch.float16 else 1e-5
                        self.assertTrue(
                            torch.isclose(loss, expected, rtol=rtol, atol=rtol),
                            (loss.item(), expected.item()),
                        )

    def test_synthesis_is_the_mix_of_its_parents(self):
        torch.manual_seed(0)
        inner = losses.SoftTripleLoss(NUM_CLASSES, EMBEDDING_SIZE, centers_per_class=3)
        wrapper = ProxySynthesisLoss(inner.to(TEST_DEVICE), mu=1.5, lam_per="pair")
        emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE)
        labels = torch.randint(0, 3, (BATCH_SIZE,), device=TEST_DEVICE)
        syn = wrapper.synthesize(emb, labels)
        x = F.normalize(emb, dim=1)
        centres = F.normalize(inner.fc.t().reshape(NUM_CLASSES, 3, -1), dim=-1)
        for m, (i, j) in enumerate(syn.pairs.tolist()):
            lam = syn.lam[m]
            expected_x = F.normalize(lam * x[i] + (1 - lam) * x[j], dim=0)
            expected_p = F.normalize(
                lam * centres[labels[i]] + (1 - lam) * centres[labels[j]], dim=-1
            )
            self.assertTrue(torch.allclose(syn.embeddings[BATCH_SIZE + m], expected_x))
            self.assertTrue(torch.allclose(syn.proxies[NUM_CLASSES + m], expected_p))
            self.assertEqual(syn.labels[BATCH_SIZE + m].item(), NUM_CLASSES + m)
        self.assertTrue(torch.allclose(syn.proxies[:NUM_CLASSES], centres))

    def test_distance_normalising_with_another_p_norm_stays_on(self):
        """Only an L2 normalisation is switched off for the call (the set is
        L2-normalised already): a distance that normalises with another p-norm does so
        as in a fresh loss over the C + M classes, and keeps its setting afterwards."""
        for p in (1, 3):
            with self.subTest(p=p):

                def build(num_classes, p=p):
                    distance = LpDistance(p=p, normalize_embeddings=True)
                    return losses.ProxyNCALoss(
                        num_classes, EMBEDDING_SIZE, softmax_scale=3, distance=distance
                    ).to(TEST_DEVICE, torch.float64)

                torch.manual_seed(0)
                inner = build(NUM_CLASSES)
                wrapper = ProxySynthesisLoss(inner)
                emb = torch.randn(
                    BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE, dtype=torch.float64
                )
                labels = torch.randint(0, 4, (BATCH_SIZE,), device=TEST_DEVICE)
                syn, loss = synthesis_and_loss(wrapper, emb, labels)
                fresh = build(len(syn.proxies))
                copy_proxies_into(fresh, syn.proxies)
                expected = fresh(syn.embeddings.detach(), syn.labels)
                self.assertTrue(
                    torch.isclose(loss, expected, rtol=1e-10), (loss, expected)
                )
                self.assertTrue(inner.distance.normalize_embeddings)


def proxy_anchor_formula(
    x, p, labels, num_real_classes, margin, alpha, divisor, excluded=None
):
    """Proxy-Anchor (Kim et al. 2020) written out on unit vectors. The positive term sums
    over the proxies with a positive; "all" divides it by their number, "real" divides
    the real proxies' part by the number of real ones among them (the synthetic part
    keeps the "all" divisor), "real_only" likewise without the synthetic part. The
    negative term averages over all proxies. ``excluded`` [rows, proxies] pairs count in
    neither term."""
    cos = x @ p.t()
    pos_mask = F.one_hot(labels, p.shape[0]).bool()
    kept = torch.ones_like(pos_mask) if excluded is None else ~excluded
    pos_exp = torch.where(pos_mask, torch.exp(-alpha * (cos - margin)), 0).sum(0)
    neg_exp = torch.where(~pos_mask & kept, torch.exp(alpha * (cos + margin)), 0).sum(0)
    with_pos = pos_mask.any(0)
    pos = torch.log1p(pos_exp) * with_pos
    neg = torch.log1p(neg_exp).sum() / p.shape[0]
    if divisor == "all":
        return pos.sum() / with_pos.sum() + neg
    real = pos[:num_real_classes].sum() / with_pos[:num_real_classes].sum()
    if divisor == "real_only":
        return real + neg
    return real + pos[num_real_classes:].sum() / with_pos.sum() + neg


def mean_norm(x):
    """A plain-function regularizer: the rows' mean L2 norm, as PML's LpRegularizer."""
    return x.norm(dim=1).mean()


class TestRegularizers(unittest.TestCase):
    def test_regularizers_see_the_real_proxies_and_embeddings(self):
        """With the inner loss's weight and embedding regularizers (PML modules, or
        plain functions as the bare loss also takes), the wrapper's loss is the loss
        without them (same synthesis) plus each regularizer on the real proxies and the
        raw batch, as without synthesis; the regularizers are restored after the call."""
        weights = {"weight_reg_weight": 0.5, "embedding_reg_weight": 0.25}
        kinds = {"module": regularizers.LpRegularizer, "function": lambda: mean_norm}
        for (kind, make), name in itertools.product(
            kinds.items(), build_losses(NUM_CLASSES)
        ):
            with self.subTest(kind=kind, loss=name):
                regularized = build_losses(
                    NUM_CLASSES,
                    weight_regularizer=make(),
                    embedding_regularizer=make(),
                    **weights,
                )[name].to(TEST_DEVICE)
                before = inner_state(regularized)
                plain = build_losses(NUM_CLASSES)[name].to(TEST_DEVICE)
                plain.load_state_dict(regularized.state_dict())
                emb = 3 * torch.randn(BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE)
                labels = torch.randint(0, 4, (BATCH_SIZE,), device=TEST_DEVICE)
                torch.manual_seed(2)
                loss = ProxySynthesisLoss(regularized)(emb, labels)
                torch.manual_seed(2)
                expected = ProxySynthesisLoss(plain)(emb, labels)
                expected = expected + 0.25 * emb.norm(dim=1).mean()
                if name != "P2SGradLoss":
                    expected = expected + 0.5 * proxy_rows(plain).norm(dim=1).mean()
                self.assertTrue(
                    torch.isclose(loss, expected, rtol=1e-5), (loss, expected)
                )
                assert_same_state(self, before, inner_state(regularized))
                self.assertEqual(vars(regularized).get("embedding_regularizer"), (
                    mean_norm if kind == "function" else None
                ))  # fmt: skip

    def test_loss_on_defaults_to_the_real_rows(self):
        """``loss_on`` without the raw batch regularises the set's real rows."""

        class Sum(torch.nn.Module):  # a probe: which rows the regularizer gets
            def forward(self, x):
                return x.sum()

        regularized = losses.ProxyAnchorLoss(
            NUM_CLASSES, EMBEDDING_SIZE, embedding_regularizer=Sum()
        )
        plain = losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
        plain.load_state_dict(regularized.state_dict())
        emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE)
        labels = torch.randint(0, 4, (BATCH_SIZE,))
        syn = ProxySynthesisLoss(plain).synthesize(emb, labels)
        expected = ProxySynthesisLoss(plain).loss_on(syn)
        expected = expected + syn.embeddings[:BATCH_SIZE].sum()
        loss = ProxySynthesisLoss(regularized).loss_on(syn)
        self.assertTrue(torch.isclose(loss, expected, rtol=1e-5), (loss, expected))


class TestPositiveDivisor(unittest.TestCase):
    def test_equals_proxy_anchor_formula(self):
        for dtype in TEST_DTYPES:
            if dtype == torch.float16:
                continue  # exp(alpha * cos) with alpha 32 overflows float16 by hand
            for divisor in ("all", "real", "real_only"):
                for mu in (0.5, 1.0, 2.0):
                    with self.subTest(dtype=dtype, divisor=divisor, mu=mu):
                        torch.manual_seed(0)
                        inner = losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
                        inner = inner.to(TEST_DEVICE, dtype)
                        wrapper = ProxySynthesisLoss(
                            inner, mu=mu, positive_divisor=divisor
                        )
                        emb = torch.randn(
                            BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE
                        )
                        emb = emb.to(dtype)
                        labels = torch.randint(0, 5, (BATCH_SIZE,), device=TEST_DEVICE)
                        syn, loss = synthesis_and_loss(wrapper, emb, labels)
                        expected = proxy_anchor_formula(
                            syn.embeddings, syn.proxies, syn.labels,
                            NUM_CLASSES, inner.margin, inner.alpha, divisor,
                        )  # fmt: skip
                        self.assertTrue(
                            torch.isclose(loss, expected, rtol=1e-5), (loss, expected)
                        )

    def test_real_divisor_strengthens_the_real_pull(self):
        torch.manual_seed(0)
        emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE)
        labels = torch.randint(0, 5, (BATCH_SIZE,))
        results = {}
        for divisor in ("all", "real"):
            torch.manual_seed(2)
            inner = losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
            wrapper = ProxySynthesisLoss(inner, positive_divisor=divisor)
            torch.manual_seed(1)
            results[divisor] = wrapper(emb, labels)
        # same synthesis, positive term divided by fewer proxies
        self.assertGreater(results["real"].item(), results["all"].item())

    def test_inner_reducer_restored_and_bad_combinations(self):
        inner = losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
        reducer = inner.reducer
        wrapper = ProxySynthesisLoss(inner, positive_divisor="real")
        wrapper(torch.randn(6, EMBEDDING_SIZE), torch.arange(6))
        self.assertIs(inner.reducer, reducer)
        with self.assertRaisesRegex(ValueError, "positive_divisor must be one of"):
            ProxySynthesisLoss(inner, positive_divisor="synthetic")
        for bad, got in (
            (
                losses.NormalizedSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE),
                "got NormalizedSoftmaxLoss, which has no such term",
            ),
            (  # PML wraps it in MultipleReducers: the term's own reducer is named
                losses.ProxyAnchorLoss(
                    NUM_CLASSES, EMBEDDING_SIZE, reducer=reducers.MeanReducer()
                ),
                "got ProxyAnchorLoss whose 'pos_loss' reducer is MeanReducer",
            ),
        ):
            for divisor in ("real", "real_only"):
                with self.assertRaisesRegex(ValueError, f"DivisorReducer.*{got}"):
                    ProxySynthesisLoss(bad, positive_divisor=divisor)

    def test_real_only_with_parents_excluded_equals_formula(self):
        # the combination that came closest to the baseline on glyphs (README results)
        for mu in (0.5, 1.0, 2.0):
            with self.subTest(mu=mu):
                torch.manual_seed(0)
                inner = losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
                inner = inner.to(TEST_DEVICE, torch.float64)
                wrapper = ProxySynthesisLoss(
                    inner, mu=mu, positive_divisor="real_only", exclude_parents=True
                )
                emb = torch.randn(
                    BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE, dtype=torch.float64
                )
                labels = torch.randint(0, 5, (BATCH_SIZE,), device=TEST_DEVICE)
                syn, loss = synthesis_and_loss(wrapper, emb, labels)
                excluded = parent_pairs_by_loop(syn.labels, syn.pairs, NUM_CLASSES)
                expected = proxy_anchor_formula(
                    syn.embeddings, syn.proxies, syn.labels, NUM_CLASSES,
                    inner.margin, inner.alpha, "real_only", excluded,
                )  # fmt: skip
                self.assertTrue(
                    torch.isclose(loss, expected, rtol=1e-10), (loss, expected)
                )


def parent_pairs_by_loop(labels, pairs, num_real_classes):
    """[B+M, C+M] bool: synthetic row m with its parents' classes, and every real row
    with the synthetic classes one of whose parents has its class."""
    num_syn = len(pairs)
    num_real_rows = len(labels) - num_syn
    excluded = torch.zeros(len(labels), num_real_classes + num_syn, dtype=torch.bool)
    for m, (i, j) in enumerate(pairs.tolist()):
        parents = (labels[i].item(), labels[j].item())
        for c in parents:
            excluded[num_real_rows + m, c] = True
        for r in range(num_real_rows):
            if labels[r].item() in parents:
                excluded[r, num_real_classes + m] = True
    return excluded.to(labels.device)


def margin_softmax_logits(cos, labels, loss):
    """ArcFace (Deng et al. 2019) or CosFace (Wang et al. 2018) logits written out: the
    target entry s*cos(theta + m), or s*(cos - m) for CosFace; s*cos elsewhere. ArcFace
    falls back to s*(cos - m*sin m) past theta = pi - m, as PML does to stay monotonic."""
    target = F.one_hot(labels, cos.shape[1]).bool()
    if isinstance(loss, losses.ArcFaceLoss):
        theta = torch.acos(cos.clamp(-1, 1))
        shifted = torch.where(
            theta <= math.pi - loss.margin,
            torch.cos(theta + loss.margin),
            cos - loss.margin * math.sin(loss.margin),
        )
    else:
        shifted = cos - loss.margin
    return loss.scale * torch.where(target, shifted, cos)


class TestExcludeParents(unittest.TestCase):
    def test_equals_formulas_without_the_parent_pairs(self):
        names = (
            "ProxyAnchorLoss",
            "ProxyNCALoss",
            "NormalizedSoftmaxLoss",
            "ArcFaceLoss",
            "CosFaceLoss",
        )
        for dtype in (torch.float32, torch.float64):
            for name in names:
                for mu in (0.5, 1.0, 2.0):
                    with self.subTest(dtype=dtype, loss=name, mu=mu):
                        torch.manual_seed(0)
                        inner = getattr(losses, name)(NUM_CLASSES, EMBEDDING_SIZE)
                        inner = inner.to(TEST_DEVICE, dtype)
                        wrapper = ProxySynthesisLoss(inner, mu=mu, exclude_parents=True)
                        emb = torch.randn(
                            BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE, dtype=dtype
                        ).requires_grad_()
                        labels = torch.randint(0, 5, (BATCH_SIZE,), device=TEST_DEVICE)
                        syn, loss = synthesis_and_loss(wrapper, emb, labels)
                        excluded = parent_pairs_by_loop(
                            syn.labels, syn.pairs, NUM_CLASSES
                        )
                        self.assertTrue(excluded.any())
                        if name == "ProxyAnchorLoss":
                            expected = proxy_anchor_formula(
                                syn.embeddings, syn.proxies, syn.labels, NUM_CLASSES,
                                inner.margin, inner.alpha, "all", excluded,
                            )  # fmt: skip
                        else:
                            cos = syn.embeddings @ syn.proxies.t()
                            if name == "ProxyNCALoss":
                                # NCA on squared distances of unit rows: 2 - 2 cos
                                logits = -inner.softmax_scale * (2 - 2 * cos)
                            elif name == "NormalizedSoftmaxLoss":
                                logits = cos / inner.temperature
                            else:
                                logits = margin_softmax_logits(cos, syn.labels, inner)
                            logits = logits.masked_fill(excluded, -float("inf"))
                            expected = F.cross_entropy(logits, syn.labels)
                        self.assertTrue(
                            torch.isclose(loss, expected, rtol=rtol_for(dtype)),
                            (loss, expected),
                        )
                        loss.backward()
                        self.assertTrue(torch.isfinite(emb.grad).all())
                        param = next(inner.parameters())
                        self.assertTrue(torch.isfinite(param.grad).all())

    def test_distance_restored_and_unsupported_losses(self):
        inner = losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
        distance = inner.distance
        wrapper = ProxySynthesisLoss(inner, exclude_parents=True)
        official = ProxySynthesisLoss(copy.deepcopy(inner))
        emb, labels = torch.randn(6, EMBEDDING_SIZE), torch.arange(6)
        torch.manual_seed(0)
        excluding = wrapper(emb, labels)
        torch.manual_seed(0)
        self.assertNotAlmostEqual(excluding.item(), official(emb, labels).item())
        self.assertIs(inner.distance, distance)
        for name in (
            "LargeMarginSoftmaxLoss",
            "SoftTripleLoss",
            "SubCenterArcFaceLoss",
        ):
            bad = build_losses(NUM_CLASSES)[name]
            message = f"exclude_parents=True needs one of .*; got {name}"
            if name == "SubCenterArcFaceLoss":  # an ArcFaceLoss: say why not
                message += (
                    r" \(a subclass of ArcFaceLoss with its own PROXY_SPECS entry: "
                    r"with several proxies per class \(sub_centers\)"
                )
            else:
                message += "$"
            with self.assertRaisesRegex(ValueError, message):
                ProxySynthesisLoss(bad, exclude_parents=True)


class TestDetachParentProxies(unittest.TestCase):
    def test_gradients_equal_a_mix_of_constant_parent_proxies(self):
        """detach_parent_proxies=True: the loss is unchanged, and the gradients are
        those of the inner loss over C + M classes whose synthetic proxies are mixes of
        the parents' proxies taken as constants, written out here; the official
        gradients of the proxies differ from them (the option changes something)."""
        for name, param, on_rows in (
            ("ProxyAnchorLoss", "proxies", True),
            ("NormalizedSoftmaxLoss", "W", False),
        ):
            with self.subTest(loss=name):
                torch.manual_seed(0)
                inner = build_losses(NUM_CLASSES)[name].to(TEST_DEVICE, torch.float64)
                emb = torch.randn(
                    BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE, dtype=torch.float64
                )
                labels = torch.randint(0, 4, (BATCH_SIZE,), device=TEST_DEVICE)
                grads = {}
                for detach in (True, False):
                    wrapper = ProxySynthesisLoss(inner, detach_parent_proxies=detach)
                    inner.zero_grad()
                    leaf = emb.clone().requires_grad_()
                    syn, loss = synthesis_and_loss(wrapper, leaf, labels)
                    loss.backward()
                    grads[detach] = (loss, leaf.grad, getattr(inner, param).grad)

                i, j = syn.pairs.unbind(1)
                lam = syn.lam
                leaf = emb.clone().requires_grad_()
                raw = getattr(inner, param).detach().clone().requires_grad_()
                x = F.normalize(leaf, dim=1)
                x_syn = F.normalize(lam * x[i] + (1 - lam) * x[j], dim=1)
                p = F.normalize(raw if on_rows else raw.t(), dim=1)
                fixed = p.detach()
                p_syn = lam * fixed[labels[i]] + (1 - lam) * fixed[labels[j]]
                all_p = torch.cat([p, F.normalize(p_syn, dim=1)])
                fresh = build_losses(len(all_p))[name].to(TEST_DEVICE, torch.float64)
                expected = torch.func.functional_call(
                    fresh,
                    {param: all_p if on_rows else all_p.t()},
                    (torch.cat([x, x_syn]), syn.labels),
                )
                expected.backward()
                loss, emb_grad, proxy_grad = grads[True]
                torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(
                    grads[False][0], expected, rtol=1e-10, atol=0
                )
                torch.testing.assert_close(emb_grad, leaf.grad, rtol=1e-8, atol=1e-12)
                torch.testing.assert_close(proxy_grad, raw.grad, rtol=1e-8, atol=1e-12)
                self.assertFalse(torch.allclose(grads[False][2], raw.grad, atol=1e-6))


class TestPairing(unittest.TestCase):
    def test_random_pairs_differ_on_m_per_class_batches(self):
        dataset_labels = np.repeat(np.arange(20), 6)
        sampler = samplers.MPerClassSampler(
            dataset_labels,
            m=4,
            batch_size=16,
            length_before_new_iter=len(dataset_labels),
        )
        indices = list(iter(sampler))
        wrapper = ProxySynthesisLoss(losses.ProxyAnchorLoss(20, EMBEDDING_SIZE), mu=2.0)
        for start in range(0, len(indices) - 15, 16):
            labels = torch.as_tensor(dataset_labels[indices[start : start + 16]])
            self.assertTrue((labels[:4] == labels[0]).all())  # contiguous runs of m
            pairs = wrapper._draw_pairs(labels, wrapper.num_synthetic_for(labels))
            self.assertEqual(len(pairs), 32)
            self.assertTrue((labels[pairs[:, 0]] != labels[pairs[:, 1]]).all())
            # the first parents cover the batch evenly: each row twice at mu = 2
            counts = torch.bincount(pairs[:, 0], minlength=16)
            self.assertTrue((counts == 2).all())

    def test_random_partner_is_uniform_over_the_other_classes(self):
        """ "random" pairs row i with a row drawn uniformly from the rows of the other
        classes: over many draws, the partners of each first parent i are counted and
        compared (chi-square) with the uniform distribution on {j : y_j != y_i},
        written out here. A partner picked by any fixed rule (the first, the nearest,
        ...) of another class satisfies the class constraint and fails here."""
        labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], device=TEST_DEVICE)
        batch_size, draws = len(labels), 1000
        emb = torch.randn(batch_size, EMBEDDING_SIZE, device=TEST_DEVICE)
        y = labels.cpu().numpy()
        for mu in (1.0, 2.0):
            wrapper = ProxySynthesisLoss(
                losses.ProxyAnchorLoss(4, EMBEDDING_SIZE).to(TEST_DEVICE), mu=mu
            )
            observed = np.zeros((batch_size, batch_size))
            torch.manual_seed(0)
            for _ in range(draws):
                pairs = wrapper.synthesize(emb, labels).pairs.cpu().numpy()
                np.add.at(observed, (pairs[:, 0], pairs[:, 1]), 1)
            # each row is a first parent mu times per call
            self.assertTrue((observed.sum(1) == mu * draws).all())
            for i in range(batch_size):
                others = y != y[i]
                self.assertEqual(observed[i, ~others].sum(), 0)
                expected = np.full(others.sum(), mu * draws / others.sum())
                p_value = scipy.stats.chisquare(observed[i, others], expected).pvalue
                self.assertGreater(p_value, 1e-3, (mu, i, observed[i]))

    def test_first_parents_of_a_partial_round_are_uniform(self):
        """With M not a multiple of B (mu 0.5, 1.5), the rows of the partial round are a
        uniform random subset: each row is a first parent floor(mu) + (mu mod 1) times
        per call on average (chi-square). Taking the first rows would pass the class
        constraint and fail here."""
        labels = torch.arange(10) % 5
        draws = 400
        for mu in (0.5, 1.5):
            wrapper = ProxySynthesisLoss(
                losses.ProxyAnchorLoss(5, EMBEDDING_SIZE), mu=mu
            )
            torch.manual_seed(0)
            counts = np.zeros(10)
            for _ in range(draws):
                pairs = wrapper._draw_pairs(labels, wrapper.num_synthetic_for(labels))
                counts += np.bincount(pairs[:, 0].numpy(), minlength=10)
            expected = np.full(10, mu * draws)
            p_value = scipy.stats.chisquare(counts, expected).pvalue
            self.assertGreater(p_value, 1e-3, (mu, counts))

    def test_random_partners_of_a_row_are_distinct_when_mu_exceeds_one(self):
        """With mu > 1 a row is a first parent in several rounds; the same pair twice
        would be two synthetic classes with one row and proxy under two labels. Rows
        with fewer other-class rows than rounds reuse them, all of them."""
        wrapper = ProxySynthesisLoss(losses.ProxyAnchorLoss(4, EMBEDDING_SIZE), mu=3.0)
        torch.manual_seed(0)
        for labels in (torch.arange(4).repeat_interleave(4), torch.arange(16) % 4):
            for _ in range(50):
                pairs = wrapper._draw_pairs(labels, wrapper.num_synthetic_for(labels))
                self.assertEqual(len(pairs), 48)
                self.assertTrue((labels[pairs[:, 0]] != labels[pairs[:, 1]]).all())
                self.assertEqual(len(set(map(tuple, pairs.tolist()))), 48)
        # rows 0-2 have a single other-class row (3), which they take every round;
        # row 3 has three, one per round
        labels = torch.tensor([0, 0, 0, 1])
        for _ in range(20):
            with self.assertWarnsRegex(UserWarning, "some pairs repeat"):
                pairs = wrapper._draw_pairs(labels, 12).tolist()
            for i in range(3):
                self.assertEqual([q for p, q in pairs if p == i], [3, 3, 3])
            self.assertEqual(sorted(q for p, q in pairs if p == 3), [0, 1, 2])
        # B = 2: the only pairs there are, alternately
        with self.assertWarnsRegex(UserWarning, "duplicate synthetic class"):
            pairs = wrapper._draw_pairs(torch.tensor([0, 1]), 6).tolist()
        self.assertEqual(sorted(pairs), [[0, 1]] * 3 + [[1, 0]] * 3)
        # no warning where no pair repeats, nor with one lam per pair (then a
        # repeated pair is mixed with another weight: another synthetic class)
        per_pair = ProxySynthesisLoss(
            losses.ProxyAnchorLoss(4, EMBEDDING_SIZE), mu=3.0, lam_per="pair"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            wrapper._draw_pairs(torch.arange(16) % 4, 48)
            per_pair._draw_pairs(torch.tensor([0, 1]), 6)

    def test_roll_pairs_with_predecessors(self):
        labels = torch.tensor([0, 1, 2, 0, 1, 2])
        wrapper = ProxySynthesisLoss(
            losses.ProxyAnchorLoss(3, EMBEDDING_SIZE), mu=2.0, pairing="roll"
        )
        pairs = wrapper._draw_pairs(labels, 12)
        expected = [(i, (i - 1) % 6) for i in range(6)] + [
            (i, (i - 2) % 6) for i in range(6)
        ]
        self.assertEqual([tuple(p) for p in pairs.tolist()], expected)

    def test_roll_raises_on_equal_neighbours(self):
        wrapper = ProxySynthesisLoss(
            losses.ProxyAnchorLoss(3, EMBEDDING_SIZE), pairing="roll"
        )
        emb = torch.randn(6, EMBEDDING_SIZE)
        with self.assertRaisesRegex(ValueError, "rows 2 and 1, which share class 1"):
            wrapper(emb, torch.tensor([0, 1, 1, 2, 0, 2]))
        with self.assertRaisesRegex(ValueError, "rows 0 and 5"):  # the wrap-around pair
            wrapper(emb, torch.tensor([0, 1, 0, 1, 2, 0]))

    def test_roll_raises_when_mu_needs_a_full_turn(self):
        """At most B-1 shifts, B(B-1) pairs: with more, a row is paired with itself."""
        emb = torch.randn(3, EMBEDDING_SIZE)
        labels = torch.tensor([0, 1, 2])
        # round(mu * 3) synthetic classes: 6, 6, 7, 9
        for mu, num_pairs in ((2.0, 6), (2.1, 6), (2.4, 7), (3.0, 9)):
            wrapper = ProxySynthesisLoss(
                losses.ProxyAnchorLoss(3, EMBEDDING_SIZE), mu=mu, pairing="roll"
            )
            with self.subTest(mu=mu):
                if num_pairs <= 6:
                    self.assertTrue(torch.isfinite(wrapper(emb, labels)))
                    continue
                message = (
                    rf"mu={mu} is too large for pairing='roll' with batch size 3: .* "
                    rf"6 synthetic classes \(mu <= 2\), not {num_pairs}"
                )
                with self.assertRaisesRegex(ValueError, message):
                    wrapper(emb, labels)

    def test_number_of_synthetic_classes(self):
        wrapper = ProxySynthesisLoss(losses.ProxyAnchorLoss(3, EMBEDDING_SIZE))
        labels = torch.tensor([0, 1] * 10)
        for mu, expected in ((0, 0), (0.1, 2), (0.125, 3), (1, 20), (2.5, 50)):
            wrapper.mu = mu
            self.assertEqual(wrapper.num_synthetic_for(labels), expected)
        self.assertEqual(wrapper.num_synthetic_for(torch.zeros(5, dtype=torch.long)), 0)


class TestLambda(unittest.TestCase):
    def test_lambda_follows_beta(self):
        for alpha in (0.4, 2.0):
            wrapper = ProxySynthesisLoss(
                losses.ProxyAnchorLoss(3, EMBEDDING_SIZE), alpha=alpha, lam_per="pair"
            )
            torch.manual_seed(0)
            lam = wrapper._draw_lam(4000, torch.zeros(1, dtype=torch.float64)).numpy()
            p_value = scipy.stats.kstest(lam, scipy.stats.beta(alpha, alpha).cdf).pvalue
            self.assertGreater(p_value, 1e-3)
            self.assertLess(  # and not some other Beta
                scipy.stats.kstest(lam, scipy.stats.beta(1.0, 1.0).cdf).pvalue, 1e-3
            )

    def test_one_lambda_per_batch_or_per_pair(self):
        emb, labels = torch.randn(8, EMBEDDING_SIZE), torch.arange(8) % 3
        for lam_per, shape in (("batch", ()), ("pair", (8,))):
            wrapper = ProxySynthesisLoss(
                losses.ProxyAnchorLoss(3, EMBEDDING_SIZE), lam_per=lam_per
            )
            self.assertEqual(wrapper.synthesize(emb, labels).lam.shape, shape)


class TestRandomness(unittest.TestCase):
    def test_manual_seed_reproduces(self):
        wrapper = ProxySynthesisLoss(losses.ProxyAnchorLoss(5, EMBEDDING_SIZE))
        emb, labels = torch.randn(10, EMBEDDING_SIZE), torch.arange(10) % 5
        results = []
        for _ in range(2):
            torch.manual_seed(7)
            np.random.seed(np.random.randint(1000))  # numpy's RNG must not matter
            syn = wrapper.synthesize(emb, labels)
            results.append((wrapper(emb, labels), syn.pairs, syn.lam))
        for a, b in zip(*results):
            self.assertTrue(torch.equal(a, b))

    def test_generator_reproduces_and_leaves_global_rng_alone(self):
        emb, labels = torch.randn(10, EMBEDDING_SIZE), torch.arange(10) % 5
        draws = []
        for _ in range(2):
            gen = torch.Generator().manual_seed(11)
            wrapper = ProxySynthesisLoss(
                losses.ProxyAnchorLoss(5, EMBEDDING_SIZE), generator=gen, lam_per="pair"
            )
            state = torch.get_rng_state()
            syn = wrapper.synthesize(emb, labels)
            self.assertTrue(torch.equal(state, torch.get_rng_state()))
            draws.append(syn)
        self.assertTrue(torch.equal(draws[0].pairs, draws[1].pairs))
        self.assertTrue(torch.equal(draws[0].lam, draws[1].lam))

    def test_generator_leaves_the_cuda_rngs_alone(self):
        """With a generator, lam is drawn from a forked CPU RNG; the CUDA RNGs, which
        the fork does not restore, must not be seeded (recorded here, without a GPU)."""
        emb, labels = torch.randn(10, EMBEDDING_SIZE), torch.arange(10) % 5
        for lam_per in LAMBDA_MODES:
            wrapper = ProxySynthesisLoss(
                losses.ProxyAnchorLoss(5, EMBEDDING_SIZE),
                generator=torch.Generator().manual_seed(11),
                lam_per=lam_per,
            )
            with mock.patch("torch.cuda.manual_seed_all") as seed_all:
                wrapper(emb, labels)
                wrapper.synthesize(emb, labels)
            seed_all.assert_not_called()

    def test_shared_generator_under_distributed(self):
        """With a process group of several ranks (mocked: world size 2, this rank 0,
        broadcast a no-op as on rank 0) each synthesis draws its seed from the
        wrapper's generator and broadcasts it from rank 0: the pairs and lam depend on
        the generator, not on the global RNG. With mu = 0 (no synthesis) there is no
        collective, and the global RNG is left alone."""
        module = "pml_proxysynth.losses.proxy_synthesis_loss"
        emb, labels = torch.randn(10, EMBEDDING_SIZE), torch.arange(10) % 5
        with (
            mock.patch(f"{module}._world_size", return_value=2),
            mock.patch("torch.distributed.get_rank", return_value=0),
            mock.patch("torch.distributed.broadcast") as broadcast,
        ):
            draws = []
            for global_seed in (1, 2):
                wrapper = ProxySynthesisLoss(
                    losses.ProxyAnchorLoss(5, EMBEDDING_SIZE),
                    generator=torch.Generator().manual_seed(11),
                    lam_per="pair",
                )
                torch.manual_seed(global_seed)
                draws.append(wrapper.synthesize(emb, labels))
            self.assertEqual(broadcast.call_count, 2)
            self.assertEqual(broadcast.call_args.kwargs, {"src": 0})
            self.assertTrue(torch.equal(draws[0].pairs, draws[1].pairs))
            self.assertTrue(torch.equal(draws[0].lam, draws[1].lam))
            broadcast.reset_mock()
            wrapper.mu = 0.0
            state = torch.get_rng_state()
            wrapper(emb, labels)
            broadcast.assert_not_called()
            self.assertTrue(torch.equal(state, torch.get_rng_state()))


class TestBareLossCases(unittest.TestCase):
    def test_mu_zero_one_class_and_eval_mode_equal_bare_loss(self):
        for dtype in TEST_DTYPES:
            for name in build_losses(NUM_CLASSES):
                with self.subTest(dtype=dtype, loss=name):
                    torch.manual_seed(0)
                    inner = build_losses(NUM_CLASSES)[name].to(TEST_DEVICE)
                    original = copy.deepcopy(inner)

                    def bare(*args, original=original):
                        # PML changes its own proxies: a fresh copy for each call
                        return copy.deepcopy(original)(*args)

                    emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE)
                    emb = emb.to(dtype)
                    labels = torch.randint(0, 4, (BATCH_SIZE,), device=TEST_DEVICE)
                    one_class = torch.full_like(labels, 2)
                    # P2SGradLoss's weight is renormalised by the wrapper before the
                    # loss renormalises it again: equal up to rounding
                    if name == "P2SGradLoss":
                        same = functools.partial(torch.allclose, rtol=1e-6, atol=0)
                    else:
                        same = torch.equal
                    wrapper = ProxySynthesisLoss(inner, mu=0, collect_stats=True)
                    self.assertTrue(same(wrapper(emb, labels), bare(emb, labels)))
                    self.assertEqual(wrapper.num_synthetic_classes, 0)
                    wrapper.mu = 1.0
                    self.assertTrue(same(wrapper(emb, one_class), bare(emb, one_class)))
                    self.assertEqual(wrapper.num_synthetic_classes, 0)
                    wrapper.eval()
                    self.assertTrue(same(wrapper(emb, labels), bare(emb, labels)))

    def test_bare_path_leaves_the_parameter_alone(self):
        """Eval mode, mu = 0 and a one-class batch run the bare inner loss, which casts
        its proxies to the embeddings' dtype in place (P2SGradLoss also renormalises
        them): the wrapper's Parameter keeps its identity, dtype and values, gets a
        gradient in its dtype, and an optimizer step still works."""
        for dtype in (torch.float16, torch.float64):
            for name in build_losses(NUM_CLASSES):
                for case in ("eval", "mu=0", "one class"):
                    with self.subTest(dtype=dtype, loss=name, case=case):
                        torch.manual_seed(0)
                        inner = build_losses(NUM_CLASSES)[name].to(TEST_DEVICE)
                        wrapper = ProxySynthesisLoss(
                            inner, mu=0 if case == "mu=0" else 1
                        )
                        wrapper.train(case != "eval")
                        param = next(inner.parameters())
                        before = param.detach().clone()
                        optimizer = torch.optim.SGD(inner.parameters(), lr=0.1)
                        emb = torch.randn(
                            BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE
                        )
                        labels = torch.randint(0, 4, (BATCH_SIZE,), device=TEST_DEVICE)
                        if case == "one class":
                            labels = torch.full_like(labels, 2)
                        wrapper(emb.to(dtype), labels).backward()
                        self.assertIs(next(inner.parameters()), param)
                        self.assertEqual(param.dtype, torch.float32)
                        if name == "P2SGradLoss":  # renormalised as the loss does
                            expected = F.normalize(before, dim=0)
                            self.assertTrue(torch.allclose(param, expected, atol=1e-6))
                        else:
                            self.assertTrue(torch.equal(param, before))
                        self.assertEqual(param.grad.dtype, torch.float32)
                        optimizer.step()
                        self.assertFalse(torch.equal(param, before))

    def test_p2sgrad_training_follows_the_bare_loss(self):
        """P2SGradLoss rescales its weight to unit norm in place on every call and takes
        the gradient there; the wrapper runs it on a copy, so it must rescale the
        Parameter itself, or the norms drift (to about 0.1 after 60 Adam steps) and
        training departs from the bare loss's: with mu = 0 (the bare path) it trains
        as the bare loss."""
        torch.manual_seed(0)
        bare = losses.P2SGradLoss(EMBEDDING_SIZE, NUM_CLASSES).to(TEST_DEVICE)
        runs = {
            "bare": bare,
            "mu=0": ProxySynthesisLoss(copy.deepcopy(bare), mu=0),
        }
        optimizers = {
            k: torch.optim.Adam(loss.parameters(), lr=0.01) for k, loss in runs.items()
        }
        g = torch.Generator().manual_seed(1)
        for _ in range(60):
            emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, generator=g)
            labels = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=g)
            values = {}
            for k, loss in runs.items():
                optimizers[k].zero_grad()
                values[k] = loss(emb.to(TEST_DEVICE), labels.to(TEST_DEVICE))
                values[k].backward()
                optimizers[k].step()
            self.assertTrue(torch.isclose(values["mu=0"], values["bare"], rtol=1e-4))
        weights = {k: next(loss.parameters()).detach() for k, loss in runs.items()}
        self.assertTrue(torch.allclose(weights["mu=0"], weights["bare"], atol=1e-4))

    def test_p2sgrad_eval_call_rescales_the_parameter_as_the_bare_loss(self):
        """The bare P2SGradLoss rescales its weight on every call, in eval mode too (a
        validation loss); the wrapper's eval call must leave the same Parameter."""
        torch.manual_seed(0)
        bare = losses.P2SGradLoss(EMBEDDING_SIZE, NUM_CLASSES).to(TEST_DEVICE)
        with torch.no_grad():
            bare.weight.mul_(3.0)
        wrapper = ProxySynthesisLoss(copy.deepcopy(bare)).eval()
        bare.eval()
        emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE)
        labels = torch.arange(BATCH_SIZE, device=TEST_DEVICE) % NUM_CLASSES
        self.assertTrue(torch.isclose(wrapper(emb, labels), bare(emb, labels)))
        self.assertTrue(torch.allclose(wrapper.loss.weight, bare.weight, atol=1e-6))

    def test_p2sgrad_second_call_before_backward(self):
        """The rescaling must not invalidate a graph built before it (two losses summed
        before one backward, or a logging call in between), as with the bare loss."""
        for mu in (0.0, 1.0):
            with self.subTest(mu=mu):
                inner = losses.P2SGradLoss(EMBEDDING_SIZE, NUM_CLASSES).to(TEST_DEVICE)
                wrapper = ProxySynthesisLoss(inner, mu=mu)
                emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE)
                labels = torch.arange(BATCH_SIZE, device=TEST_DEVICE) % NUM_CLASSES
                first = wrapper(emb, labels)
                with torch.no_grad():
                    wrapper(emb, labels)
                (first + wrapper(emb, labels)).backward()
                self.assertTrue(torch.isfinite(inner.weight.grad).all())

    def test_synthesize_without_synthetic_classes(self):
        inner = losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
        emb = torch.randn(5, EMBEDDING_SIZE)
        for mu, labels in ((0.0, torch.arange(5)), (1.0, torch.full((5,), 3))):
            with self.subTest(mu=mu):
                syn = ProxySynthesisLoss(inner, mu=mu).synthesize(emb, labels)
                self.assertEqual(syn.pairs.shape, (0, 2))
                self.assertTrue(torch.equal(syn.labels, labels))
                self.assertTrue(torch.allclose(syn.embeddings, F.normalize(emb)))
                self.assertTrue(
                    torch.allclose(syn.proxies, F.normalize(inner.proxies, dim=1))
                )
        empty = ProxySynthesisLoss(inner).synthesize(
            torch.randn(0, EMBEDDING_SIZE), torch.zeros(0, dtype=torch.long)
        )
        self.assertEqual(empty.embeddings.shape, (0, EMBEDDING_SIZE))
        self.assertEqual(empty.pairs.shape, (0, 2))
        with self.assertRaisesRegex(ValueError, "labels"):
            ProxySynthesisLoss(inner).synthesize(emb, None)

    def test_stats(self):
        wrapper = ProxySynthesisLoss(
            losses.ProxyAnchorLoss(5, EMBEDDING_SIZE), mu=0.5, collect_stats=True
        )
        emb, labels = torch.randn(10, EMBEDDING_SIZE), torch.arange(10) % 5
        torch.manual_seed(0)
        wrapper(emb, labels)
        torch.manual_seed(0)
        syn = wrapper.synthesize(emb, labels)
        self.assertEqual(wrapper.num_synthetic_classes, 5)
        self.assertAlmostEqual(wrapper.lam, syn.lam.item(), places=6)
        self.assertEqual(
            set(wrapper._record_these_stats), {"lam", "num_synthetic_classes"}
        )
        self.assertTrue({"alpha", "mu"} <= set(wrapper._record_these))
        quiet = ProxySynthesisLoss(losses.ProxyAnchorLoss(5, EMBEDDING_SIZE))
        self.assertFalse(hasattr(quiet, "num_synthetic_classes"))
        # one lam per pair: the recorded lam is their mean
        per_pair = ProxySynthesisLoss(
            losses.ProxyAnchorLoss(5, EMBEDDING_SIZE),
            lam_per="pair",
            collect_stats=True,
        )
        torch.manual_seed(0)
        per_pair(emb, labels)
        torch.manual_seed(0)
        syn = per_pair.synthesize(emb, labels)
        self.assertEqual(syn.lam.shape, (10,))
        self.assertAlmostEqual(per_pair.lam, syn.lam.mean().item(), places=6)


def seeded_loss_function(wrapper, generator, param_name, labels):
    """loss(embeddings, proxies) with the same pairs and lam on every evaluation."""

    def loss_of(embeddings, proxies):
        generator.manual_seed(0)
        return torch.func.functional_call(
            wrapper, {param_name: proxies}, (embeddings, labels)
        )

    return loss_of


class TestGradientsAndState(unittest.TestCase):
    def test_gradcheck(self):
        for name in ("ProxyAnchorLoss", "NormalizedSoftmaxLoss", "SoftTripleLoss"):
            with self.subTest(loss=name):
                torch.manual_seed(0)
                inner = build_losses(4, 3)[name].to(TEST_DEVICE, torch.float64)
                gen = torch.Generator()
                wrapper = ProxySynthesisLoss(inner, mu=1.0, generator=gen)
                param_name, param = next(iter(wrapper.named_parameters()))
                labels = torch.tensor([0, 1, 2, 1, 3], device=TEST_DEVICE)
                emb = torch.randn(5, 3, dtype=torch.float64, device=TEST_DEVICE)
                loss_of = seeded_loss_function(wrapper, gen, param_name, labels)
                inputs = (emb.requires_grad_(), param.detach().clone().requires_grad_())
                self.assertTrue(torch.autograd.gradcheck(loss_of, inputs))

    def test_gradients_reach_inner_proxies_and_embeddings(self):
        for name in build_losses(NUM_CLASSES):
            with self.subTest(loss=name):
                inner = build_losses(NUM_CLASSES)[name].to(TEST_DEVICE)
                wrapper = ProxySynthesisLoss(inner)
                emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE)
                emb.requires_grad_()
                labels = torch.randint(0, 4, (BATCH_SIZE,), device=TEST_DEVICE)
                wrapper(emb, labels).backward()
                param = next(inner.parameters())
                self.assertGreater(param.grad.abs().sum().item(), 0)
                self.assertGreater(emb.grad.abs().sum().item(), 0)

    def test_parameters_state_dict_and_to(self):
        inner = losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
        wrapper = ProxySynthesisLoss(inner)
        self.assertEqual([n for n, _ in wrapper.named_parameters()], ["loss.proxies"])
        self.assertIs(next(wrapper.parameters()), inner.proxies)
        state = wrapper.state_dict()
        other = ProxySynthesisLoss(losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE))
        other.load_state_dict(state)
        self.assertTrue(torch.equal(other.loss.proxies, inner.proxies))
        emb, labels = torch.randn(6, EMBEDDING_SIZE), torch.arange(6) % 3
        torch.manual_seed(0)
        a = wrapper(emb, labels)
        torch.manual_seed(0)
        self.assertTrue(torch.equal(a, other(emb, labels)))
        wrapper.to(TEST_DEVICE, torch.float64)
        self.assertEqual(inner.proxies.dtype, torch.float64)
        self.assertEqual(inner.proxies.device.type, TEST_DEVICE.type)

    def test_optimizer_on_inner_loss_trains_the_proxies(self):
        inner = losses.NormalizedSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE)
        wrapper = ProxySynthesisLoss(inner)
        before = inner.W.detach().clone()
        optimizer = torch.optim.SGD(inner.parameters(), lr=0.1)
        wrapper(torch.randn(8, EMBEDDING_SIZE), torch.arange(8) % 4).backward()
        optimizer.step()
        self.assertFalse(torch.equal(before, inner.W))


def is_container(value):
    return isinstance(value, (list, dict, set, tuple))


# attributes that PML's own losses write on every call (a DivisorReducer's divisor)
PER_CALL_OUTPUTS = {"divisor"}


class UnitProxies(torch.Tensor):
    """Marks an expected value that is a renormalised Parameter."""


def unit_proxies(param, spec):
    """The proxies of ``param`` rescaled to unit norm, by hand."""
    if spec.classes_on_rows:
        norms = param.pow(2).sum(1, keepdim=True).sqrt()
    else:
        norms = param.pow(2).sum(0, keepdim=True).sqrt()
    return (param / norms).as_subclass(UnitProxies)


def inner_state(loss):
    """Everything a call could change on a PML loss and its submodules (distance,
    reducer, ...), stats aside: its parameters (the objects, their dtypes, devices and
    values), its submodules (the objects) and their public attributes. A proxy
    Parameter that the loss renormalises in place on every call (P2SGradLoss) is
    expected back as its normalised value (the wrapper does that renormalisation)."""
    spec = find_proxy_spec(loss)
    params = {
        n: (p, p.dtype, p.device, p.detach().clone())
        for n, p in loss.named_parameters()
    }
    if spec.renormalizes_in_place:
        param = params[spec.param]
        params[spec.param] = param[:3] + (unit_proxies(param[3], spec),)
    modules = dict(loss.named_modules())
    attrs = {
        f"{name}.{k}": (
            v.clone() if torch.is_tensor(v) else copy.copy(v) if is_container(v) else v
        )
        for name, module in loss.named_modules()
        for k, v in vars(module).items()
        if not k.startswith("_") and k not in getattr(module, "_record_these_stats", [])
    }
    return params, modules, attrs


def assert_same_state(test: unittest.TestCase, before, after):
    """Two ``inner_state`` results are equal: the same parameter and submodule objects,
    parameters of the same dtype, device and values, equal attributes. Only the
    attributes in ``PER_CALL_OUTPUTS`` may appear after a call (PML's bare loss writes
    them as well)."""
    (params, modules, attrs), (params_after, modules_after, attrs_after) = before, after
    test.assertEqual(params.keys(), params_after.keys())
    for name, (param, dtype, device, value) in params.items():
        now = params_after[name][0]
        test.assertIs(now, param, name)
        test.assertEqual((now.dtype, now.device), (dtype, device), name)
        if isinstance(value, UnitProxies):  # renormalised (again): up to rounding
            test.assertTrue(torch.allclose(now.detach(), value, atol=1e-6), name)
        else:
            test.assertTrue(torch.equal(now.detach(), value), name)
    test.assertEqual(modules.keys(), modules_after.keys())
    for name, module in modules.items():
        test.assertIs(modules_after[name], module, name)
    extra = {k.rsplit(".", 1)[-1] for k in attrs_after.keys() - attrs.keys()}
    test.assertLessEqual(extra, PER_CALL_OUTPUTS)
    test.assertLessEqual(attrs.keys(), attrs_after.keys())
    for k, v in attrs.items():
        w = attrs_after[k]
        if torch.is_tensor(v):
            # torch.equal compares values only: a cast or a move is a change as well
            test.assertEqual((w.dtype, w.device), (v.dtype, v.device), k)
            test.assertTrue(torch.equal(v.cpu(), w.cpu()), k)
        else:
            test.assertEqual(v, w, k)


class TestStateHelpers(unittest.TestCase):
    """``assert_same_state`` sees every change a call could leave behind."""

    def test_changes_are_detected(self):
        def wrap_distance(loss):
            loss.distance = _WithoutPairs(loss.distance, torch.zeros(1, 1).bool())

        def renormalise(loss):
            loss.proxies.data = F.normalize(loss.proxies.data, dim=1)

        def cast(loss):
            loss.proxies.data = loss.proxies.data.double()

        def replace(loss):
            loss.proxies = torch.nn.Parameter(loss.proxies.detach().clone())

        def cast_constant(loss):  # a plain tensor attribute, to the same values
            loss.n_range = loss.n_range.double()

        for change in (wrap_distance, renormalise, cast, replace, cast_constant):
            with self.subTest(change=change.__name__):
                inner = (
                    losses.LargeMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE)
                    if change is cast_constant
                    else losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
                )
                before = inner_state(inner)
                assert_same_state(self, before, inner_state(inner))
                change(inner)
                with self.assertRaises(AssertionError):
                    assert_same_state(self, before, inner_state(inner))


class TestInnerLossUnchanged(unittest.TestCase):
    def assert_same_state(self, before, after):
        assert_same_state(self, before, after)

    def test_after_a_call(self):
        with_regularizers = {
            "weight_regularizer": regularizers.LpRegularizer(),
            "embedding_regularizer": regularizers.LpRegularizer(),
        }
        for dtype in TEST_DTYPES:
            for name, kwargs in itertools.product(
                build_losses(NUM_CLASSES), ({}, with_regularizers)
            ):
                with self.subTest(dtype=dtype, loss=name, regularized=bool(kwargs)):
                    inner = build_losses(NUM_CLASSES, **kwargs)[name]
                    before = inner_state(inner)
                    wrapper = ProxySynthesisLoss(inner, mu=2.0)
                    emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE).to(dtype)
                    labels = torch.randint(0, 4, (BATCH_SIZE,))
                    wrapper(emb, labels)
                    self.assert_same_state(before, inner_state(inner))
                    wrapper.eval()  # the bare inner loss
                    wrapper(emb, labels)
                    wrapper.train()
                    self.assert_same_state(before, inner_state(inner))

    def test_large_margin_constants_survive_a_float16_call(self):
        """PML's LargeMarginSoftmaxLoss and SphereFaceLoss cast their multiple-angle
        constants (binom(margin, 2n), ...) to the embeddings' dtype, and move them to
        their device, on every call; in float16, binom(20, 10) = 184756 becomes inf.
        After a float16 call (NaN, as PML's own loss gives at this margin), the wrapper
        on the synthesis and on the bare path still gives in float64 what a loss never
        called in float16 gives: a fresh one on the enlarged set, or a copy."""
        for cls, training in itertools.product(
            (losses.LargeMarginSoftmaxLoss, losses.SphereFaceLoss), (True, False)
        ):
            with self.subTest(loss=cls.__name__, training=training):
                torch.manual_seed(0)
                inner = cls(NUM_CLASSES, EMBEDDING_SIZE, margin=20).to(TEST_DEVICE)
                untouched = copy.deepcopy(inner)
                wrapper = ProxySynthesisLoss(inner)
                wrapper.train(training)
                emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE)
                labels = torch.randint(0, 4, (BATCH_SIZE,), device=TEST_DEVICE)
                wrapper(emb.half(), labels)
                emb = emb.double()
                if training:
                    syn, loss = synthesis_and_loss(wrapper, emb, labels)
                    fresh = cls(len(syn.proxies), EMBEDDING_SIZE, margin=20)
                    copy_proxies_into(fresh.to(TEST_DEVICE), syn.proxies)
                    expected = fresh(syn.embeddings.detach(), syn.labels)
                else:
                    loss, expected = wrapper(emb, labels), untouched(emb, labels)
                self.assertTrue(torch.isfinite(expected), expected)
                self.assertTrue(
                    torch.isclose(loss, expected, rtol=1e-6), (loss, expected)
                )

    def test_training_after_a_call_in_inference_mode(self):
        """The constants that PML's LargeMarginSoftmaxLoss and SphereFaceLoss cast on
        every call, cast under torch.inference_mode (a validation loss), are inference
        tensors, which autograd refuses to save for backward: the next training step
        raised. The wrapper's loss and gradients are those of a copy never called under
        inference mode."""
        for cls, training in itertools.product(
            (losses.LargeMarginSoftmaxLoss, losses.SphereFaceLoss), (True, False)
        ):
            with self.subTest(loss=cls.__name__, inference_call_training=training):
                torch.manual_seed(0)
                inner = cls(NUM_CLASSES, EMBEDDING_SIZE).to(TEST_DEVICE)
                wrapper = ProxySynthesisLoss(inner)
                untouched = copy.deepcopy(wrapper)
                emb = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, device=TEST_DEVICE)
                labels = torch.randint(0, 4, (BATCH_SIZE,), device=TEST_DEVICE)
                wrapper.train(training)
                with torch.inference_mode():
                    wrapper(emb, labels)
                wrapper.train()
                results = []
                for loss_fn in (wrapper, untouched):
                    x = emb.clone().requires_grad_()
                    torch.manual_seed(1)
                    loss = loss_fn(x, labels)
                    loss.backward()
                    results.append((loss, x.grad, next(loss_fn.parameters()).grad))
                for got, expected in zip(*results):
                    self.assertTrue(torch.equal(got, expected))

    def test_after_a_call_that_raised(self):
        class FailingProxyAnchor(losses.ProxyAnchorLoss):
            def compute_loss(self, *args, **kwargs):
                # patched for the call: the enlarged set's proxies and class count
                assert self.proxies.shape[0] == self.num_classes > NUM_CLASSES
                assert not isinstance(self.proxies, torch.nn.Parameter)
                assert not self.distance.normalize_embeddings
                raise RuntimeError("boom")

        inner = FailingProxyAnchor(NUM_CLASSES, EMBEDDING_SIZE)
        before = inner_state(inner)
        wrapper = ProxySynthesisLoss(inner)
        with self.assertRaisesRegex(RuntimeError, "boom"):
            wrapper(torch.randn(6, EMBEDDING_SIZE), torch.arange(6) % 3)
        self.assert_same_state(before, inner_state(inner))
        self.assertEqual(inner.num_classes, NUM_CLASSES)


class TestBadInput(unittest.TestCase):
    def setUp(self):
        self.wrapper = ProxySynthesisLoss(losses.ProxyNCALoss(4, EMBEDDING_SIZE))
        self.emb = torch.randn(6, EMBEDDING_SIZE)
        self.labels = torch.arange(6) % 4

    def test_labels_out_of_range(self):
        for bad in (
            torch.tensor([0, 1, 2, 3, 4, 0]),
            torch.tensor([0, 1, -1, 3, 0, 0]),
        ):
            with self.assertRaisesRegex(ValueError, r"labels must lie in \[0, 4\)"):
                self.wrapper(self.emb, bad)

    def test_shapes(self):
        with self.assertRaisesRegex(ValueError, "Number of embeddings must equal"):
            self.wrapper(self.emb, self.labels[:5])
        with self.assertRaisesRegex(ValueError, r"shape \[B, 8\]"):
            self.wrapper(torch.randn(6, 5), self.labels)
        for dtype in (torch.float32, torch.bool):
            with self.assertRaisesRegex(ValueError, "labels must be integers"):
                self.wrapper(self.emb, self.labels.to(dtype))
        for dtype in (torch.int64, torch.bool, torch.complex64):
            with self.assertRaisesRegex(
                ValueError, "embeddings must be floating point"
            ):
                self.wrapper(self.emb.to(dtype), self.labels)

    def test_label_range_counts_classes_not_centres(self):
        """Multi-centre losses hold C*k proxies for C classes: the labels must lie in
        [0, C), not [0, C*k)."""
        for inner in (
            losses.SoftTripleLoss(4, EMBEDDING_SIZE, centers_per_class=3),
            losses.SubCenterArcFaceLoss(
                num_classes=4, embedding_size=EMBEDDING_SIZE, sub_centers=2
            ),
        ):
            with self.subTest(loss=type(inner).__name__):
                wrapper = ProxySynthesisLoss(inner)
                self.assertTrue(torch.isfinite(wrapper(self.emb, self.labels)))
                with self.assertRaisesRegex(ValueError, r"labels must lie in \[0, 4\)"):
                    wrapper(self.emb, torch.tensor([0, 1, 2, 3, 4, 0]))

    def test_hyperparameters(self):
        inner = losses.ProxyAnchorLoss(4, EMBEDDING_SIZE)
        for kwargs, message in (
            ({"alpha": 0}, "alpha must be a finite number > 0"),
            ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
            ({"alpha": float("inf")}, "alpha must be a finite number > 0, got inf"),
            ({"alpha": "0.4"}, "alpha must be a finite number > 0, got '0.4'"),
            ({"alpha": True}, "alpha must be a finite number > 0, got True"),
            ({"mu": -0.5}, "mu must be a finite number >= 0"),
            ({"mu": float("nan")}, "mu must be a finite number >= 0"),
            ({"mu": float("inf")}, "mu must be a finite number >= 0, got inf"),
            ({"mu": None}, "mu must be a finite number >= 0, got None"),
            # bool("no") is True: a switch must be a bool
            ({"exclude_parents": "no"}, "exclude_parents must be True or False"),
            ({"detach_parent_proxies": None}, "detach_parent_proxies must be True or"),
            ({"generator": 0}, "generator must be a torch.Generator or None, got 0"),
            ({"pairing": "shuffle"}, "pairing must be one of"),
            ({"lam_per": "sample"}, "lam_per must be one of"),
            # the inner loss's would be used: never silently ignored
            ({"distance": LpDistance()}, "takes no distance"),
            ({"reducer": reducers.SumReducer()}, "takes no reducer"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                ProxySynthesisLoss(inner, **kwargs)

    def test_ref_emb_and_indices_tuple(self):
        with self.assertRaisesRegex(ValueError, "ref_emb is not supported"):
            self.wrapper(self.emb, self.labels, ref_emb=self.emb.clone())
        triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
        with self.assertRaisesRegex(ValueError, "does not accept indices_tuple"):
            self.wrapper(self.emb, self.labels, triplets)

    def test_unsupported_loss(self):
        with self.assertRaisesRegex(TypeError, "TripletMarginLoss.*ProxyAnchorLoss"):
            ProxySynthesisLoss(losses.TripletMarginLoss())

    def test_narrow_integer_labels(self):
        """Labels of any integer dtype work as int64: the synthetic labels C, ...,
        C+M-1 (here past int8's 127) do not overflow, and the loss is PML's on the
        enlarged set (training) or on the batch (eval) with int64 labels."""
        num_classes, batch_size = 120, 16
        emb = torch.randn(batch_size, EMBEDDING_SIZE, device=TEST_DEVICE)
        labels = torch.randint(0, 10, (batch_size,), device=TEST_DEVICE)
        for name in ("ProxyAnchorLoss", "ProxyNCALoss"):
            for dtype in (
                torch.int8,
                torch.uint8,
                torch.int16,
                torch.uint16,
                torch.int32,
                torch.uint32,
                torch.uint64,
            ):
                with self.subTest(loss=name, dtype=dtype):
                    torch.manual_seed(0)
                    inner = build_losses(num_classes)[name].to(TEST_DEVICE)
                    wrapper = ProxySynthesisLoss(inner)
                    syn, loss = synthesis_and_loss(wrapper, emb, labels.to(dtype))
                    self.assertEqual(syn.labels.dtype, torch.int64)
                    expected_labels = torch.arange(
                        num_classes, num_classes + batch_size
                    )
                    self.assertTrue(
                        torch.equal(syn.labels[batch_size:].cpu(), expected_labels)
                    )
                    fresh = build_losses(num_classes + batch_size)[name].to(TEST_DEVICE)
                    copy_proxies_into(fresh, syn.proxies)
                    expected = fresh(syn.embeddings.detach(), syn.labels)
                    self.assertTrue(torch.isclose(loss, expected, rtol=1e-5))
                    wrapper.eval()
                    bare = copy.deepcopy(inner)(emb, labels)
                    self.assertTrue(torch.equal(wrapper(emb, labels.to(dtype)), bare))

    def test_non_finite_embeddings(self):
        for value in (float("nan"), float("inf")):
            emb = self.emb.clone()
            emb[2, 3] = value
            with self.assertRaisesRegex(ValueError, "NaN or inf"):
                self.wrapper(emb, self.labels)
        # finite float16 rows whose sum overflows (to inf) are accepted
        big = torch.full((32, 64), 50.0, dtype=torch.float16)
        self.assertTrue(torch.isinf(big.sum()))
        wrapper = ProxySynthesisLoss(losses.ProxyAnchorLoss(4, 64))
        syn = wrapper.synthesize(big, torch.arange(32) % 4)
        self.assertTrue(torch.isfinite(syn.embeddings).all())

    def test_class_count_attributes_that_disagree_with_the_proxies(self):
        """An inner loss whose class count (or centres per class) no longer matches
        its proxies, e.g. changed after construction, indexed past its proxies in its
        own call (an IndexError in eval mode) or was reshaped wrongly: a ValueError
        naming the attribute, at construction and on every call."""
        emb, labels = torch.randn(8, EMBEDDING_SIZE), torch.arange(8) % 3
        cases = [
            (losses.ArcFaceLoss, {}, "num_classes", 2, "ArcFaceLoss.num_classes is for 2"),
            (losses.ProxyNCALoss, {}, "proxy_labels", torch.arange(4),
             "ProxyNCALoss.proxy_labels is for 4 classes, but its 5 proxies"),
            (losses.SubCenterArcFaceLoss, {"sub_centers": 2}, "sub_centers", 3,
             "10 proxies, not a multiple of its sub_centers \\(3\\)"),
            (losses.SoftTripleLoss, {"centers_per_class": 2}, "centers_per_class", 1,
             "SoftTripleLoss.num_classes is for 5 classes, but its 10 proxies"),
        ]  # fmt: skip
        for loss_class, kwargs, attr, value, message in cases:
            with self.subTest(loss=loss_class.__name__):
                inner = loss_class(
                    num_classes=5, embedding_size=EMBEDDING_SIZE, **kwargs
                )
                wrapper = ProxySynthesisLoss(inner)
                setattr(inner, attr, value)
                for mode in (wrapper.train, wrapper.eval):
                    mode()
                    with self.assertRaisesRegex(ValueError, message):
                        wrapper(emb, labels)
                with self.assertRaisesRegex(ValueError, message):
                    ProxySynthesisLoss(inner)

    def test_float16_rows_of_any_finite_norm(self):
        """float16 rows with a tiny (< 1.5e-5, whose reciprocal overflows) or a huge
        (> 65504) norm give the loss of the same rows at a normal scale, not NaN: the
        scale of an embedding does not matter once it is normalised."""
        # small integers times powers of 2: exact in float16 at every scale below
        base = torch.randint(
            -8, 9, (32, 64), generator=torch.Generator().manual_seed(1)
        )
        labels = torch.arange(32) % 4
        wrapper = ProxySynthesisLoss(losses.ProxyAnchorLoss(4, 64, alpha=8))

        def loss_at(scale):
            torch.manual_seed(0)
            return wrapper((base * scale).half(), labels)

        expected = loss_at(2.0**-4)
        self.assertTrue(torch.isfinite(expected))
        # norms of about 2.5e-6 and 9e4
        for scale in (2.0**-24, 2.0**11):
            with self.subTest(scale=scale):
                torch.testing.assert_close(loss_at(scale), expected, rtol=2e-2, atol=0)

    def test_reducers_that_cannot_reduce_the_enlarged_set(self):
        """An inner DoNothingReducer returns the loss dict, not a loss (the wrapper's
        own reducer failed on it with an AttributeError, also in eval mode), and an
        inner ClassWeightedReducer indexes its C weights with the synthetic labels C,
        ..., C+M-1 (an IndexError; a device-side assert on CUDA): a ValueError at
        construction, whether the reducer is the loss's own or one of its
        MultipleReducers. The bare PML loss takes both."""
        weighted = reducers.ClassWeightedReducer(torch.ones(4))
        for make, name, named in (
            (lambda term: reducers.DoNothingReducer(), "own", "DoNothingReducer"),
            (lambda term: copy.deepcopy(weighted), "own", "ClassWeightedReducer"),
            (
                lambda term: reducers.MultipleReducers({term: copy.deepcopy(weighted)}),
                "in MultipleReducers",
                "ClassWeightedReducer",
            ),
        ):
            for cls, term in (
                (losses.NormalizedSoftmaxLoss, "loss"),
                (losses.ProxyAnchorLoss, "pos_loss"),
            ):
                with self.subTest(loss=cls.__name__, reducer=named, where=name):
                    inner = cls(4, EMBEDDING_SIZE, reducer=make(term))
                    copy.deepcopy(inner)(self.emb, self.labels)  # PML takes it
                    message = f"{cls.__name__} with a {named}"
                    with self.assertRaisesRegex(ValueError, message):
                        ProxySynthesisLoss(inner)


class TestIntegration(unittest.TestCase):
    def test_subclass_of_supported_loss(self):
        """A subclass is handled as its listed base class: wrapped, it gives what the
        base class gives with the same proxies and draws."""

        class MyArcFace(losses.ArcFaceLoss):
            pass

        mine = MyArcFace(4, EMBEDDING_SIZE)
        base = losses.ArcFaceLoss(4, EMBEDDING_SIZE)
        base.load_state_dict(mine.state_dict())
        emb, labels = torch.randn(6, EMBEDDING_SIZE), torch.arange(6) % 4
        results = []
        for inner in (mine, base):
            generator = torch.Generator().manual_seed(1)
            wrapper = ProxySynthesisLoss(inner, generator=generator)
            self.assertIs(wrapper.spec, PROXY_SPECS[losses.ArcFaceLoss])
            results.append(wrapper(emb, labels))
        self.assertTrue(torch.equal(*results))

    def test_get_logits_passes_through(self):
        inner = losses.ProxyAnchorLoss(4, EMBEDDING_SIZE)
        emb = torch.randn(6, EMBEDDING_SIZE)
        logits = ProxySynthesisLoss(inner).get_logits(emb)
        self.assertTrue(torch.equal(logits, inner.get_logits(emb)))
        self.assertEqual(logits.shape, (6, 4))

    def test_distributed_wrapper_accepts_it(self):
        wrapper = ProxySynthesisLoss(losses.ProxyAnchorLoss(4, EMBEDDING_SIZE))
        self.assertIs(distributed.DistributedLossWrapper(wrapper).loss, wrapper)

    def test_autocast(self):
        device_type = TEST_DEVICE.type
        amp_dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
        for name, lam_per in itertools.product(build_losses(NUM_CLASSES), LAMBDA_MODES):
            if name == "P2SGradLoss" and amp_dtype == torch.bfloat16:
                continue  # PML's bare P2SGradLoss fails its unit-norm assert under bf16
            with self.subTest(loss=name, lam_per=lam_per):
                self.check_autocast(name, lam_per, device_type, amp_dtype)

    def test_cuda_autocast_simulated_on_cpu(self):
        """Under CUDA autocast ``torch.is_autocast_enabled()`` is True, so PML's
        ``to_dtype`` leaves the proxies float32 while the embeddings (and lam) are
        reduced precision; simulated with CPU autocast and that flag."""
        for name, lam_per in itertools.product(build_losses(NUM_CLASSES), LAMBDA_MODES):
            if name == "P2SGradLoss":
                continue  # PML's bare P2SGradLoss fails its unit-norm assert under bf16
            with self.subTest(loss=name, lam_per=lam_per):
                self.check_autocast(
                    name, lam_per, "cpu", torch.bfloat16, simulate_cuda=True
                )

    def check_autocast(self, name, lam_per, device_type, amp_dtype, simulate_cuda=False):  # fmt: skip
        """A finite loss and proxy gradient, and float32 proxies, under autocast."""
        inner = build_losses(NUM_CLASSES)[name].to(device_type)
        wrapper = ProxySynthesisLoss(inner, lam_per=lam_per)
        layer = torch.nn.Linear(EMBEDDING_SIZE, EMBEDDING_SIZE).to(device_type)
        x = torch.randn(BATCH_SIZE, EMBEDDING_SIZE, device=device_type)
        labels = torch.randint(0, 4, (BATCH_SIZE,), device=device_type)
        with torch.autocast(device_type, dtype=amp_dtype):
            # patched inside the autocast block only: autocast's exit restores the
            # state its enter read, and would leave CPU autocast on for good
            with (
                mock.patch("torch.is_autocast_enabled", return_value=True)
                if simulate_cuda
                else contextlib.nullcontext()
            ):
                loss = wrapper(layer(x), labels)
        loss.backward()
        self.assertTrue(torch.isfinite(loss))
        self.assertTrue(torch.isfinite(next(inner.parameters()).grad).all())
        self.assertEqual(next(inner.parameters()).dtype, torch.float32)

    def test_metric_loss_only_trainer(self):
        torch.manual_seed(0)
        num_classes, per_class = 6, 10
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        data = torch.randn(len(labels), 16) + 3 * F.one_hot(labels, 16).float()
        dataset = torch.utils.data.TensorDataset(data, labels)
        trunk = torch.nn.Linear(16, EMBEDDING_SIZE)
        loss = ProxySynthesisLoss(losses.ProxyAnchorLoss(num_classes, EMBEDDING_SIZE))
        before = loss.loss.proxies.detach().clone()
        trainer = trainers.MetricLossOnly(
            models={"trunk": trunk, "embedder": torch.nn.Identity()},
            optimizers={
                "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=1e-2),
                "metric_loss_optimizer": torch.optim.Adam(loss.parameters(), lr=1e-1),
            },
            batch_size=20,
            loss_funcs={"metric_loss": loss},
            dataset=dataset,
            sampler=samplers.MPerClassSampler(
                labels, m=5, batch_size=20, length_before_new_iter=len(labels)
            ),
            iterations_per_epoch=5,
            dataloader_num_workers=0,
        )
        trainer.train(num_epochs=1)
        self.assertFalse(torch.equal(before, loss.loss.proxies))
        self.assertTrue(torch.isfinite(torch.tensor(trainer.losses["metric_loss"])))


if __name__ == "__main__":
    unittest.main()
