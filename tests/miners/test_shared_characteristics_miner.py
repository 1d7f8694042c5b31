"""Tests of SharedCharacteristicsMiner against references written here.

The distribution tests draw many independent triplets per anchor in one call
(triplets_per_anchor=k) from a small batch and compare the counts with probabilities
computed directly from the Wu et al. formula (scipy.stats.chisquare), or with the counts of
a per-anchor loop sampler in the authors' style (contingency test). Seeds are fixed, so
the tests are deterministic; each p-value threshold is 1e-3.
"""

import itertools
import unittest

import numpy as np
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import (
    CrossBatchMemory,
    MarginLoss,
    TripletMarginLoss,
)
from scipy import stats

from pml_proxysynth.miners import SharedCharacteristicsMiner

from .. import TEST_DEVICE, TEST_DTYPES, WITH_COLLECT_STATS

P_MIN = 1e-3
DRAWS = 20000
# 12 rows, 4 classes of 3, in 8 dimensions: distances spread over [0.2, 1.9], so both
# the lower cutoff and both terms of the weight matter, and every cell gets draws.
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
DIM = 8


def small_batch(dtype, seed=0, labels=LABELS):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(labels), DIM, generator=g, dtype=torch.float64)
    emb = torch.nn.functional.normalize(emb, dim=1)
    return emb.to(dtype).to(TEST_DEVICE), torch.tensor(labels).to(TEST_DEVICE)


def as_numpy64(x):
    return x.detach().cpu().to(torch.float64).numpy()


def ref_log_weights(emb, ref_emb, cutoff=0.5):
    """log w_aj = (2-d) log D - ((d-3)/2) log(1 - D^2/4), D = max(||e_a - e_j||, cutoff)."""
    x, r = as_numpy64(emb), as_numpy64(ref_emb)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    r = r / np.linalg.norm(r, axis=1, keepdims=True)
    d = x.shape[1]
    dist = np.sqrt(((x[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    assert dist.max() < 2 - 1e-3, "test data must stay away from the antipodal clamp"
    dist = np.maximum(dist, cutoff)
    return (2.0 - d) * np.log(dist) - ((d - 3.0) / 2.0) * np.log(1.0 - dist**2 / 4.0)


def normalised(log_w, mask):
    w = np.where(mask, np.exp(log_w - log_w[mask].max()), 0.0)
    return w / w.sum()


def expected_joint(log_w_row, y_a, ref_labels, strategy):
    """P(n = j, p = i) for one anchor under "standard" or "full": [M, M] (n, p)."""
    m = len(ref_labels)
    p_neg = normalised(log_w_row, ref_labels != y_a)
    joint = np.zeros((m, m))
    for j in np.nonzero(p_neg)[0]:
        third = (ref_labels != y_a) & (ref_labels != ref_labels[j])
        if strategy == "standard":
            p_pos = third / third.sum()
        else:
            p_pos = normalised(log_w_row, third)
        joint[j] = p_neg[j] * p_pos
    return joint


def counts(a, x, n_rows, n_cols, y=None):
    """Per-anchor histograms of x (or of the pairs (x, y)): [n_rows, n_cols(, n_cols)]."""
    a, x = a.cpu().numpy(), x.cpu().numpy()
    if y is None:
        flat = np.bincount(a * n_cols + x, minlength=n_rows * n_cols)
        return flat.reshape(n_rows, n_cols).astype(float)
    flat = np.bincount(
        (a * n_cols + x) * n_cols + y.cpu().numpy(), minlength=n_rows * n_cols**2
    )
    return flat.reshape(n_rows, n_cols, n_cols).astype(float)


def chisquare_groups(observed, expected, min_expected=5.0):
    """One Pearson chi-square over independent groups (one per anchor).

    Cells with a small expected count are pooled within their group; the degrees of
    freedom are sum over groups of (cells - 1), passed to scipy via ddof.
    """
    obs_all, exp_all = [], []
    for obs, exp in zip(observed, expected):
        obs, exp = np.ravel(obs), np.ravel(exp)
        assert obs[exp == 0].sum() == 0, "a cell with probability 0 was drawn"
        small = (exp < min_expected) & (exp > 0)
        big = exp >= min_expected
        obs_all.append(
            np.append(obs[big], obs[small].sum()) if small.any() else obs[big]
        )
        exp_all.append(
            np.append(exp[big], exp[small].sum()) if small.any() else exp[big]
        )
    f_obs, f_exp = np.concatenate(obs_all), np.concatenate(exp_all)
    return stats.chisquare(f_obs, f_exp, ddof=len(obs_all) - 1).pvalue


def contingency_groups(counts_a, counts_b):
    """Two-sample test of per-anchor histograms: sum of per-group contingency statistics."""
    stat, dof = 0.0, 0
    for a, b in zip(counts_a, counts_b):
        a, b = np.ravel(a), np.ravel(b)
        keep = (a + b) > 0
        if keep.sum() < 2:
            continue
        res = stats.chi2_contingency(np.stack([a[keep], b[keep]]), correction=False)
        stat, dof = stat + res.statistic, dof + res.dof
    return stats.chi2.sf(stat, dof)


def loop_reference_sampler(emb, labels, strategy, draws, rng, cutoff=0.5):
    """Per-anchor loop in the authors' style (numpy): negative, then positive.

    Returns (a, p, n) arrays. The positive distribution only depends on the class of the
    negative, so the draws of one anchor are grouped by that class.
    """
    x = as_numpy64(emb)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = labels.cpu().numpy()
    bs, dim = x.shape
    dist = np.maximum(np.linalg.norm(x[:, None] - x[None], axis=-1), cutoff)
    log_q_inv = (2.0 - dim) * np.log(dist) - ((dim - 3) / 2.0) * np.log(
        1.0 - 0.25 * dist**2
    )
    anchors, positives, negatives = [], [], []
    for i in range(bs):
        neg = labels != labels[i]
        q = np.exp(log_q_inv[i] - np.max(log_q_inv[i][neg])) * neg
        n = rng.choice(bs, size=draws, p=q / q.sum())
        p = np.empty(draws, dtype=np.int64)
        for c in np.unique(labels[n]):
            sel = labels[n] == c
            pos = neg & (labels != c)
            if strategy == "standard":
                p[sel] = rng.choice(np.nonzero(pos)[0], size=sel.sum())
            else:
                w = np.exp(log_q_inv[i] - np.max(log_q_inv[i][pos])) * pos
                p[sel] = rng.choice(bs, size=sel.sum(), p=w / w.sum())
        anchors.append(np.full(draws, i))
        positives.append(p)
        negatives.append(n)
    return tuple(
        torch.from_numpy(np.concatenate(v)) for v in (anchors, positives, negatives)
    )


class TestSharedCharacteristicsMinerConstraints(unittest.TestCase):
    def test_class_constraints(self):
        label_sets = [
            torch.arange(16).repeat_interleave(2),  # 2 per class
            torch.arange(8).repeat_interleave(4),  # 4 per class
            torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 3, 1, 4, 4, 0, 2]),  # unbalanced
            torch.tensor([5, 9, 5, 7]),  # 3 classes, sizes 2-1-1
        ]
        for dtype in TEST_DTYPES:
            for labels in label_sets:
                labels = labels.to(TEST_DEVICE)
                emb = torch.randn(len(labels), 16).to(dtype).to(TEST_DEVICE)
                for strategy in ("standard", "full"):
                    for k in (1, 3):
                        miner = SharedCharacteristicsMiner(
                            strategy=strategy, triplets_per_anchor=k
                        )
                        a, p, n = miner(emb, labels)
                        for idx in (a, p, n):
                            self.assertEqual(idx.dtype, torch.long)
                            self.assertEqual(idx.device, emb.device)
                        ya, yp, yn = labels[a], labels[p], labels[n]
                        self.assertTrue(torch.all(ya != yp))
                        self.assertTrue(torch.all(ya != yn))
                        self.assertTrue(torch.all(yp != yn))
                        # every anchor is served (>= 3 classes), k times
                        self.assertTrue(
                            torch.equal(
                                a, torch.arange(len(labels)).repeat_interleave(k).to(a)
                            )
                        )
                        self.assertEqual(miner.num_triplets, len(labels) * k)

    def test_random_strategy_constraints(self):
        labels = torch.arange(8).repeat_interleave(2).to(TEST_DEVICE)
        for dtype in TEST_DTYPES:
            emb = torch.randn(16, 8).to(dtype).to(TEST_DEVICE)
            miner = SharedCharacteristicsMiner(strategy="random")
            torch.manual_seed(1)
            same_class_pos = 0
            for _ in range(20):
                a, p, n = miner(emb, labels)
                self.assertTrue(torch.all(a != p))
                self.assertTrue(torch.all(a != n))
                self.assertTrue(torch.all(p != n))
                # a pseudo-label permutation keeps class sizes: all groups have 2 rows
                self.assertEqual(len(a), 16)
                same_class_pos += int((labels[a] == labels[p]).sum())
            # documented: the true classes of a and p may coincide
            self.assertGreater(same_class_pos, 0)


class TestSharedCharacteristicsMinerDistribution(unittest.TestCase):
    def test_standard_and_full_match_formula(self):
        labels_np = np.array(LABELS)
        n_rows = len(LABELS)
        for dtype in TEST_DTYPES:
            emb, labels = small_batch(dtype)
            log_w = ref_log_weights(emb, emb)
            for strategy in ("standard", "full"):
                torch.manual_seed(0)
                miner = SharedCharacteristicsMiner(
                    strategy=strategy, triplets_per_anchor=DRAWS
                )
                a, p, n = miner(emb, labels)
                self.assertEqual(len(a), n_rows * DRAWS)
                joint = counts(a, n, n_rows, n_rows, y=p)
                expected = np.stack(
                    [
                        DRAWS
                        * expected_joint(log_w[i], labels_np[i], labels_np, strategy)
                        for i in range(n_rows)
                    ]
                )
                self.assertGreater(chisquare_groups(joint, expected), P_MIN)
                # the marginal of the negative alone, and of the positive given n
                self.assertGreater(
                    chisquare_groups(joint.sum(2), expected.sum(2)), P_MIN
                )

    def test_standard_with_rare_third_class(self):
        # few rows of a third class: most proposals of the positive's rejection
        # sampler fail, so its exact fallback is exercised too
        labels_np = np.array([0] * 9 + [1, 1, 2])
        n_rows = len(labels_np)
        for dtype in TEST_DTYPES:
            emb, labels = small_batch(dtype, seed=6, labels=labels_np.tolist())
            log_w = ref_log_weights(emb, emb)
            torch.manual_seed(0)
            miner = SharedCharacteristicsMiner(triplets_per_anchor=DRAWS // 4)
            a, p, n = miner(emb, labels)
            self.assertEqual(len(a), n_rows * DRAWS // 4)
            observed = counts(a, n, n_rows, n_rows, y=p)
            expected = [
                DRAWS
                // 4
                * expected_joint(log_w[i], labels_np[i], labels_np, "standard")
                for i in range(n_rows)
            ]
            self.assertGreater(chisquare_groups(observed, expected), P_MIN)

    def test_detects_uniform_negatives(self):
        # the chi-square test has power: uniform negatives are rejected
        emb, labels = small_batch(torch.float64)
        labels_np = np.array(LABELS)
        log_w = ref_log_weights(emb, emb)
        rng = np.random.default_rng(0)
        observed, expected = [], []
        for i in range(len(LABELS)):
            cand = np.nonzero(labels_np != labels_np[i])[0]
            draws = rng.choice(cand, size=DRAWS)
            observed.append(np.bincount(draws, minlength=len(LABELS)))
            expected.append(DRAWS * normalised(log_w[i], labels_np != labels_np[i]))
        self.assertLess(chisquare_groups(observed, expected), 1e-6)

    def test_agrees_with_loop_reference(self):
        n_rows = len(LABELS)
        for dtype in TEST_DTYPES:
            emb, labels = small_batch(dtype, seed=1)
            for strategy in ("standard", "full"):
                torch.manual_seed(3)
                miner = SharedCharacteristicsMiner(
                    strategy=strategy, triplets_per_anchor=DRAWS // 4
                )
                ours = miner(emb, labels)
                ref = loop_reference_sampler(
                    emb, labels, strategy, DRAWS // 4, np.random.default_rng(3)
                )
                ours_neg = counts(ours[0], ours[2], n_rows, n_rows)
                ref_neg = counts(ref[0], ref[2], n_rows, n_rows)
                self.assertGreater(contingency_groups(ours_neg, ref_neg), P_MIN)
                ours_joint = counts(ours[0], ours[2], n_rows, n_rows, y=ours[1])
                ref_joint = counts(ref[0], ref[2], n_rows, n_rows, y=ref[1])
                self.assertGreater(contingency_groups(ours_joint, ref_joint), P_MIN)

    def test_random_strategy_distribution(self):
        # One permutation per call: with many draws per anchor, each anchor's positives
        # reveal its pseudo-group, and the draws are checked given that grouping.
        n_rows = len(LABELS)
        for dtype in TEST_DTYPES:
            emb, labels = small_batch(dtype, seed=2)
            log_w = ref_log_weights(emb, emb)
            torch.manual_seed(5)
            miner = SharedCharacteristicsMiner(
                strategy="random", triplets_per_anchor=DRAWS
            )
            a, p, n = miner(emb, labels)
            self.assertEqual(len(a), n_rows * DRAWS)
            self.assertTrue(torch.all(a != p))
            pos_counts = counts(a, p, n_rows, n_rows)
            neg_counts = counts(a, n, n_rows, n_rows)
            groups = pos_counts > 0
            np.fill_diagonal(groups, True)
            # the groups form a partition with the class sizes of the true labels
            self.assertTrue(np.array_equal(groups, groups.T))
            g = groups.astype(int)
            self.assertTrue(np.array_equal(g @ g, 3 * g))
            self.assertTrue(np.all(groups.sum(1) == 3))
            # negatives never share the anchor's pseudo-label
            self.assertEqual(neg_counts[groups].sum(), 0)
            exp_pos = [
                DRAWS * (g & (np.arange(n_rows) != i)) / 2 for i, g in enumerate(groups)
            ]
            exp_neg = [DRAWS * normalised(log_w[i], ~groups[i]) for i in range(n_rows)]
            self.assertGreater(chisquare_groups(pos_counts, exp_pos), P_MIN)
            self.assertGreater(chisquare_groups(neg_counts, exp_neg), P_MIN)

    def test_ref_emb(self):
        # anchors index embeddings, p and n index ref_emb, labels from ref_labels;
        # also a non-default cutoff
        n_rows = 6
        for dtype in TEST_DTYPES:
            ref_emb, ref_labels = small_batch(dtype, seed=3)
            emb = small_batch(dtype, seed=4)[0][:n_rows]
            labels = torch.tensor([0, 1, 2, 3, 4, 0]).to(TEST_DEVICE)  # 4 not in ref
            # cutoff 1.0: many pairs are closer, so the clamp matters
            log_w = ref_log_weights(emb, ref_emb, cutoff=1.0)
            torch.manual_seed(0)
            miner = SharedCharacteristicsMiner(
                strategy="full", cutoff=1.0, triplets_per_anchor=DRAWS
            )
            a, p, n = miner(emb, labels, ref_emb, ref_labels)
            self.assertEqual(len(a), n_rows * DRAWS)
            self.assertTrue(torch.all(labels[a] != ref_labels[p]))
            self.assertTrue(torch.all(labels[a] != ref_labels[n]))
            self.assertTrue(torch.all(ref_labels[p] != ref_labels[n]))
            y, ry = labels.cpu().numpy(), ref_labels.cpu().numpy()
            expected = np.stack(
                [
                    DRAWS * expected_joint(log_w[i], y[i], ry, "full")
                    for i in range(n_rows)
                ]
            )
            observed = counts(a, n, n_rows, len(ry), y=p)
            self.assertGreater(chisquare_groups(observed, expected), P_MIN)

    def test_ref_emb_of_another_dtype(self):
        # query and reference rows of different dtypes are mined in their common dtype
        # (at least float32): the same triplets as with both rows cast to it first
        ref64, ref_labels = small_batch(torch.float64, seed=3)
        emb64 = small_batch(torch.float64, seed=4)[0][:6]
        labels = torch.tensor([0, 1, 2, 3, 0, 1]).to(TEST_DEVICE)
        for query_dtype, ref_dtype in itertools.permutations(TEST_DTYPES, 2):
            common = torch.promote_types(
                torch.promote_types(query_dtype, ref_dtype), torch.float32
            )
            emb, ref = emb64.to(query_dtype), ref64.to(ref_dtype)
            for strategy in ("standard", "full", "random"):
                miner = SharedCharacteristicsMiner(
                    strategy=strategy, triplets_per_anchor=50
                )
                torch.manual_seed(0)
                got = miner(emb, labels, ref, ref_labels)
                torch.manual_seed(0)
                expected = miner(emb.to(common), labels, ref.to(common), ref_labels)
                self.assertGreater(len(got[0]), 0)
                for g, e in zip(got, expected):
                    self.assertTrue(torch.equal(g, e), (query_dtype, ref_dtype))

    def test_rows_are_stabilised_separately(self):
        # d = 512: log-weights at D = 0.5 and D = sqrt(2) differ by about 370, so a
        # shift by a max over the whole matrix would underflow every weight of anchor 2
        # (all its candidates at sqrt(2)) in float32 and drop it
        dim, theta = 512, 2 * np.arcsin(0.25)
        emb = torch.zeros(5, dim, dtype=torch.float64)
        emb[0, 0] = 1.0
        emb[1, 0], emb[1, 1] = np.cos(theta), np.sin(theta)  # at distance 0.5 of row 0
        emb[2, 2] = emb[3, 3] = emb[4, 4] = 1.0
        labels = torch.arange(5).to(TEST_DEVICE)
        for dtype in TEST_DTYPES:
            torch.manual_seed(0)
            miner = SharedCharacteristicsMiner(triplets_per_anchor=DRAWS // 10)
            a, p, n = miner(emb.to(dtype).to(TEST_DEVICE), labels)
            self.assertEqual(len(a), 5 * DRAWS // 10)
            neg = counts(a, n, 5, 5)
            self.assertEqual(neg[0, 1], DRAWS // 10)  # weight ratio e^370 vs the rest
            expected = DRAWS // 10 * (np.arange(5) != 2) / 4.0
            self.assertGreater(chisquare_groups([neg[2]], [expected]), P_MIN)

    def test_draws_on_banned_columns_are_invalid(self):
        """A cumulative sum that gives a banned (zero-weight) column some mass, as a
        parallel scan's rounding can on CUDA, must not yield a draw on it: such a draw
        is reported invalid, so its triplet is dropped instead of breaking the class
        constraint."""
        miner = SharedCharacteristicsMiner(generator=torch.Generator().manual_seed(0))
        # row 0: all mass on banned column 1 (an exaggerated rounding error); row 1: fine
        weights = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
        banned = torch.tensor([[False, True, False], [False, True, False]])
        idx, valid = miner._sample(weights, 50, banned)
        self.assertTrue(bool((idx[0] == 1).all()))
        self.assertFalse(bool(valid[0].any()))
        self.assertTrue(bool(valid[1].all()))
        self.assertFalse(bool((idx[1] == 1).any()))

    def test_nonzero_loss_cutoff(self):
        for dtype in TEST_DTYPES:
            emb, labels = small_batch(dtype)
            dist = np.linalg.norm(
                as_numpy64(emb)[:, None] - as_numpy64(emb)[None], axis=-1
            )
            miner = SharedCharacteristicsMiner(
                nonzero_loss_cutoff=1.2, triplets_per_anchor=50
            )
            a, p, n = miner(emb, labels)
            self.assertTrue(np.all(dist[a.cpu(), n.cpu()] < 1.2 + 1e-2))
            y = np.array(LABELS)
            servable = [
                i for i in range(len(y)) if np.any((y != y[i]) & (dist[i] < 1.2 - 1e-2))
            ]
            self.assertTrue(set(servable) <= set(a.cpu().tolist()))

    def test_nonzero_loss_cutoff_full_positives(self):
        """The upper cutoff restricts negatives only: under "full" the positive is
        distance-weighted over all third-class rows, far ones included."""
        cutoff = 1.2  # no pair of the batch lies within 0.025 of it
        labels_np = np.array(LABELS)
        n_rows = len(LABELS)
        for dtype in TEST_DTYPES:
            emb, labels = small_batch(dtype)
            x = as_numpy64(emb)
            dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
            log_w = ref_log_weights(emb, emb)
            torch.manual_seed(0)
            miner = SharedCharacteristicsMiner(
                strategy="full", nonzero_loss_cutoff=cutoff, triplets_per_anchor=DRAWS
            )
            a, p, n = miner(emb, labels)
            expected = np.zeros((n_rows, n_rows, n_rows))
            for i in range(n_rows):
                near = (labels_np != labels_np[i]) & (dist[i] < cutoff)
                if not near.any():
                    continue  # no negative: the anchor is not served
                p_neg = normalised(log_w[i], near)
                for j in np.nonzero(near)[0]:
                    third = (labels_np != labels_np[i]) & (labels_np != labels_np[j])
                    expected[i, j] = DRAWS * p_neg[j] * normalised(log_w[i], third)
            self.assertEqual(len(a), round(expected.sum()))
            observed = counts(a, n, n_rows, n_rows, y=p)
            served = expected.sum((1, 2)) > 0
            self.assertGreater(
                chisquare_groups(observed[served], expected[served]), P_MIN
            )
            # some positives lie beyond the cutoff
            self.assertTrue(np.any(dist[a.cpu(), p.cpu()] > cutoff))

    def test_random_strategy_shuffles_query_and_ref_labels_together(self):
        """With a separate ref_emb, one permutation of the query and reference labels
        together: query rows of a class that ref_emb lacks still find pseudo-label
        partners there. An anchor is served iff its pseudo-label is on some reference
        row; over the 12! permutations of the labels below that has probability
        4/12 * (1 - 1/C(11, 3)) + 8/12 * (1 - 3/11) (label 5, whose 3 other copies
        must not all be on the 3 other query rows, or one of the 8 labels that occur
        twice, whose copy must not be on them)."""
        ref_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]).to(TEST_DEVICE)
        labels = torch.full((4,), 5).to(TEST_DEVICE)
        p_served = 4 / 12 * (1 - 1 / 165) + 8 / 12 * (1 - 3 / 11)
        calls = 50
        for dtype in TEST_DTYPES:
            g = torch.Generator().manual_seed(0)
            emb = torch.randn(4, 8, generator=g).to(dtype).to(TEST_DEVICE)
            ref_emb = torch.randn(8, 8, generator=g).to(dtype).to(TEST_DEVICE)
            miner = SharedCharacteristicsMiner(strategy="random")
            torch.manual_seed(0)
            served = 0
            for _ in range(calls):
                a, p, n = miner(emb, labels, ref_emb, ref_labels)
                self.assertEqual(len(torch.unique(a)), len(a))
                served += len(a)
            pvalue = stats.binomtest(served, 4 * calls, p_served).pvalue
            self.assertGreater(pvalue, P_MIN, served)


class TestSharedCharacteristicsMinerEdgeCases(unittest.TestCase):
    def test_fewer_than_three_classes(self):
        for dtype in TEST_DTYPES:
            emb = torch.randn(8, 4).to(dtype).to(TEST_DEVICE)
            for labels in ([0, 0, 0, 0, 1, 1, 1, 1], [3] * 8):
                labels = torch.tensor(labels).to(TEST_DEVICE)
                for strategy in ("standard", "full"):
                    a, p, n = SharedCharacteristicsMiner(strategy=strategy)(emb, labels)
                    for idx in (a, p, n):
                        self.assertEqual(len(idx), 0)
                        self.assertEqual(idx.dtype, torch.long)
                        self.assertEqual(idx.device, emb.device)
            # random: one class gives no negatives; two classes work
            one = torch.zeros(8, dtype=torch.long).to(TEST_DEVICE)
            self.assertEqual(
                len(SharedCharacteristicsMiner(strategy="random")(emb, one)[0]), 0
            )
            two = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]).to(TEST_DEVICE)
            self.assertEqual(
                len(SharedCharacteristicsMiner(strategy="random")(emb, two)[0]), 8
            )

    def test_anchor_without_third_class_is_skipped(self):
        # with ref_emb: anchor class 2 sees classes {0, 1} (served), class 0 sees {1} only
        ref_emb = torch.randn(4, 4).to(TEST_DEVICE)
        ref_labels = torch.tensor([0, 0, 1, 1]).to(TEST_DEVICE)
        emb = torch.randn(3, 4).to(TEST_DEVICE)
        labels = torch.tensor([2, 0, 2]).to(TEST_DEVICE)
        a, p, n = SharedCharacteristicsMiner()(emb, labels, ref_emb, ref_labels)
        self.assertEqual(a.tolist(), [0, 2])

    def test_duplicate_and_antipodal_embeddings(self):
        labels = torch.arange(6).repeat_interleave(2).to(TEST_DEVICE)
        for dtype in TEST_DTYPES:
            base = torch.randn(1, 8)
            cases = {
                "duplicates": base.repeat(12, 1),
                "antipodal": torch.cat([base, -base]).repeat(6, 1),
                "zero rows": torch.cat([torch.zeros(6, 8), base.repeat(6, 1)]),
            }
            for name, emb in cases.items():
                emb = emb.to(dtype).to(TEST_DEVICE)
                for cutoff in (0.0, 0.5):
                    for strategy in ("standard", "full", "random"):
                        miner = SharedCharacteristicsMiner(
                            strategy=strategy, cutoff=cutoff, collect_stats=True
                        )
                        a, p, n = miner(emb, labels)
                        msg = f"{name} {strategy} {cutoff} {dtype}"
                        self.assertTrue(torch.all(a != p) and torch.all(a != n), msg)
                        self.assertTrue(
                            np.isfinite(miner.avg_anchor_negative_dist), msg
                        )
                        if strategy != "random":
                            self.assertEqual(len(a), 12, msg)
                            self.assertTrue(torch.all(labels[p] != labels[n]), msg)
                        else:  # a same-class duplicate counts as the anchor itself
                            self.assertGreater(len(a), 0, msg)
                            for other in (p, n):
                                dup = is_duplicate(emb, labels, a, other)
                                self.assertFalse(bool(dup.any()), msg)

    def test_duplicates_give_uniform_negatives(self):
        # all distances clamped to the cutoff: all candidates weigh the same
        labels = torch.arange(4).repeat_interleave(3).to(TEST_DEVICE)
        emb = torch.ones(12, 8).to(TEST_DEVICE)
        torch.manual_seed(0)
        a, p, n = SharedCharacteristicsMiner(triplets_per_anchor=DRAWS // 4)(
            emb, labels
        )
        obs = counts(a, n, 12, 12)
        y = labels.cpu().numpy()
        exp = [DRAWS / 4 * (y != y[i]) / 9 for i in range(12)]
        self.assertGreater(chisquare_groups(obs, exp), P_MIN)

    def test_non_finite_raises(self):
        labels = torch.arange(4).repeat_interleave(2).to(TEST_DEVICE)
        for dtype in TEST_DTYPES:
            for bad in (float("nan"), float("inf"), -float("inf")):
                emb = torch.randn(8, 4).to(dtype).to(TEST_DEVICE)
                emb[3, 1] = bad
                miner = SharedCharacteristicsMiner()
                with self.assertRaisesRegex(
                    ValueError, "embeddings contain NaN or Inf"
                ):
                    miner(emb, labels)
                good = torch.randn(8, 4).to(dtype).to(TEST_DEVICE)
                with self.assertRaisesRegex(ValueError, "ref_emb contain NaN or Inf"):
                    miner(good, labels, emb, labels)
                # a bad query row (not the first) against a finite ref_emb
                with self.assertRaisesRegex(
                    ValueError, "embeddings contain NaN or Inf"
                ):
                    miner(emb, labels, good, labels)

    def test_zero_columns_raise(self):
        labels = torch.arange(6).to(TEST_DEVICE)
        with self.assertRaisesRegex(ValueError, "at least one column"):
            SharedCharacteristicsMiner()(torch.zeros(6, 0).to(TEST_DEVICE), labels)

    def test_shapes_other_than_n_by_d_raise(self):
        labels = torch.arange(6).to(TEST_DEVICE)
        miner = SharedCharacteristicsMiner()
        emb = torch.randn(6, 4).to(TEST_DEVICE)
        with self.assertRaisesRegex(ValueError, r"shape \[N, D\].*\(6, 2, 2\)"):
            miner(emb.reshape(6, 2, 2), labels)
        with self.assertRaisesRegex(ValueError, r"same D, got \(6, 4\) and \(6, 3\)"):
            miner(emb, labels, torch.randn(6, 3).to(TEST_DEVICE), labels)

    def test_large_finite_values_are_accepted(self):
        emb = torch.full((8, 4), 6.0e4, dtype=torch.float16).to(TEST_DEVICE)
        emb[::2] *= -1
        labels = torch.arange(4).repeat_interleave(2).to(TEST_DEVICE)
        self.assertEqual(len(SharedCharacteristicsMiner()(emb, labels)[0]), 8)

    def test_row_scale_does_not_matter(self):
        # a huge finite row must not overflow to a zero row, nor a tiny one stay
        # below unit norm: the draws equal those of the unscaled rows
        g = torch.Generator().manual_seed(4)
        emb = torch.randn(12, 8, generator=g).to(TEST_DEVICE)
        labels = (torch.arange(12) % 4).to(TEST_DEVICE)
        miner = SharedCharacteristicsMiner(strategy="full", triplets_per_anchor=200)
        torch.manual_seed(5)
        expected = miner(emb, labels)
        for scale in (2e19, 1e-30):
            scaled = emb.clone()
            scaled[4] *= scale
            self.assertTrue(bool(torch.isfinite(scaled).all()))
            torch.manual_seed(5)
            for x, y in zip(expected, miner(scaled, labels)):
                self.assertTrue(torch.equal(x, y), scale)

    def test_bad_constructor_args(self):
        bad = [
            {"strategy": "shared"},
            {"strategy": None},
            {"cutoff": -0.1},
            {"cutoff": 2.0},
            {"cutoff": float("nan")},
            {"cutoff": "0.5"},
            {"cutoff": 0.5, "nonzero_loss_cutoff": 0.5},
            {"nonzero_loss_cutoff": "1.4"},
            {"triplets_per_anchor": 0},
            {"triplets_per_anchor": 1.5},
            {"triplets_per_anchor": True},
            {"generator": 0},
        ]
        for kwargs in bad:
            with self.assertRaises(ValueError, msg=str(kwargs)):
                SharedCharacteristicsMiner(**kwargs)
        for distance in (
            CosineSimilarity(),
            LpDistance(power=2),
            LpDistance(normalize_embeddings=False),
        ):
            # a ValueError (README), not PML's assert, which python -O drops
            with self.assertRaisesRegex(ValueError, "LpDistance"):
                SharedCharacteristicsMiner(distance=distance)
        SharedCharacteristicsMiner(distance=LpDistance(p=2, power=1))
        miner = SharedCharacteristicsMiner(
            cutoff=0, nonzero_loss_cutoff=1.4, triplets_per_anchor=np.int64(2)
        )
        self.assertEqual(miner.triplets_per_anchor, 2)
        self.assertIn("cutoff", miner._record_these)
        self.assertIn("triplets_per_anchor", miner._record_these)

    def test_triplets_per_anchor_count(self):
        labels = torch.arange(8).repeat_interleave(2).to(TEST_DEVICE)
        for dtype in TEST_DTYPES:
            emb = torch.randn(16, 8).to(dtype).to(TEST_DEVICE)
            for strategy in ("standard", "full", "random"):
                a, p, n = SharedCharacteristicsMiner(
                    strategy=strategy, triplets_per_anchor=5
                )(emb, labels)
                self.assertEqual(len(a), 80)
                self.assertTrue(
                    torch.equal(
                        torch.bincount(a, minlength=16).cpu(), torch.full((16,), 5)
                    )
                )
                # independent draws: the 5 negatives of an anchor are not all equal
                self.assertGreater(len(torch.unique(a * 16 + n)), 16)

    def test_reproducible_and_generator(self):
        emb, labels = small_batch(torch.float32)
        for strategy in ("standard", "full", "random"):
            miner = SharedCharacteristicsMiner(strategy=strategy, triplets_per_anchor=4)
            torch.manual_seed(7)
            first = miner(emb, labels)
            torch.manual_seed(7)
            second = miner(emb, labels)
            for x, y in zip(first, second):
                self.assertTrue(torch.equal(x, y))
            gen_miner = SharedCharacteristicsMiner(
                strategy=strategy,
                triplets_per_anchor=4,
                generator=torch.Generator(device=emb.device).manual_seed(1),
            )
            torch.manual_seed(0)
            state = torch.get_rng_state()
            g_first = gen_miner(emb, labels)
            self.assertTrue(torch.equal(state, torch.get_rng_state()))
            gen_miner.generator.manual_seed(1)
            g_second = gen_miner(emb, labels)
            for x, y in zip(g_first, g_second):
                self.assertTrue(torch.equal(x, y))

    def test_autocast_does_not_change_draws(self):
        # a mixed-precision trainer mines under autocast; the weights must still be
        # computed in float32 (at D = 512 a half-precision matmul moves candidate
        # probabilities by up to 0.35)
        device_type = torch.device(TEST_DEVICE).type
        amp_dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
        g = torch.Generator().manual_seed(3)
        emb = torch.randn(32, 512, generator=g).to(TEST_DEVICE)
        labels = (torch.arange(32) % 8).to(TEST_DEVICE)
        for strategy in ("standard", "full", "random"):
            miner = SharedCharacteristicsMiner(
                strategy=strategy, triplets_per_anchor=64
            )
            torch.manual_seed(11)
            plain = miner(emb, labels)
            torch.manual_seed(11)
            with torch.autocast(device_type, dtype=amp_dtype):
                mixed = miner(emb, labels)
            for x, y in zip(plain, mixed):
                self.assertTrue(torch.equal(x, y), strategy)

    def test_empty_batch(self):
        emb = torch.zeros(0, 8).to(TEST_DEVICE)
        labels = torch.zeros(0, dtype=torch.long).to(TEST_DEVICE)
        a, p, n = SharedCharacteristicsMiner()(emb, labels)
        self.assertEqual(len(a), 0)

    def test_feeds_triplet_losses(self):
        labels = torch.arange(8).repeat_interleave(2).to(TEST_DEVICE)
        for dtype in TEST_DTYPES:
            emb = torch.randn(
                16, 8, dtype=dtype, device=TEST_DEVICE, requires_grad=True
            )
            miner = SharedCharacteristicsMiner()
            triplets = miner(emb, labels)
            for loss_fn in (
                TripletMarginLoss(),
                MarginLoss(learn_beta=True, num_classes=8),
            ):
                loss = loss_fn(emb, labels, triplets)
                loss.backward()
                self.assertTrue(torch.isfinite(loss))
            self.assertTrue(torch.all(torch.isfinite(emb.grad)))

    def test_in_cross_batch_memory(self):
        """PML's CrossBatchMemory mines each batch against its memory (ref_emb), which
        holds the batch too: the triplets its loss receives (a in the batch, p and n in
        the memory) keep the class constraint (for "random": neither p nor n is the
        anchor's own memory row), and the loss is the triplet formula on them."""
        margin, seen = 0.1, []  # seen: the inner loss's positional arguments
        for dtype, strategy in itertools.product(TEST_DTYPES, ("standard", "random")):
            torch.manual_seed(0)
            inner = TripletMarginLoss(margin=margin)
            inner.register_forward_pre_hook(lambda _, args: seen.append(args))
            memory = CrossBatchMemory(
                inner, embedding_size=8, memory_size=24,
                miner=SharedCharacteristicsMiner(strategy=strategy),
            )  # fmt: skip
            for _ in range(3):  # the third batch overwrites the memory's oldest rows
                emb = torch.randn(16, 8, dtype=dtype, device=TEST_DEVICE)
                emb.requires_grad_(True)
                labels = torch.randint(0, 6, (16,), device=TEST_DEVICE)
                loss = memory(emb, labels)
                loss.backward()
                _, _, (a, p, n), ref_emb, ref_labels = seen[-1]
                self.assertGreater(len(a), 0)
                self.assertTrue(bool((a < len(emb)).all()))
                if strategy == "random":
                    own_row = memory.curr_batch_idx[a]
                    self.assertTrue(bool(((p != own_row) & (n != own_row)).all()))
                else:
                    y_a, y_p, y_n = labels[a], ref_labels[p], ref_labels[n]
                    self.assertTrue(
                        bool(((y_a != y_p) & (y_a != y_n) & (y_p != y_n)).all())
                    )
                x = torch.nn.functional.normalize(emb.detach().double(), dim=1)
                r = torch.nn.functional.normalize(ref_emb.detach().double(), dim=1)
                d_ap = (x[a] - r[p]).norm(dim=1)
                d_an = (x[a] - r[n]).norm(dim=1)
                hinge = torch.relu(d_ap - d_an + margin)
                expected = hinge[hinge > 0].mean() if (hinge > 0).any() else 0.0
                tol = 1e-2 if dtype == torch.float16 else 1e-5
                self.assertAlmostEqual(float(loss.detach()), float(expected), delta=tol)
                self.assertTrue(bool(torch.isfinite(emb.grad).all()))


def is_duplicate(emb, labels, a, other):
    """Whether row ``other`` has the class and the (nonzero) embedding of row ``a``."""
    return (
        (emb[a] == emb[other]).all(1)
        & (emb[a] != 0).any(1)
        & (labels[a] == labels[other])
    )


class TestSharedCharacteristicsMinerStats(unittest.TestCase):
    def check_stats(self, miner, emb, labels):
        a, p, n = miner(emb, labels)
        x = as_numpy64(emb)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        a, p, n = a.cpu().numpy(), p.cpu().numpy(), n.cpu().numpy()
        ap = np.linalg.norm(x[a] - x[p], axis=1).mean()
        an = np.linalg.norm(x[a] - x[n], axis=1).mean()
        tol = 1e-2 if emb.dtype == torch.float16 else 1e-5
        self.assertAlmostEqual(miner.avg_anchor_positive_dist, ap, delta=tol)
        self.assertAlmostEqual(miner.avg_anchor_negative_dist, an, delta=tol)
        self.assertEqual(miner.num_triplets, len(a))

    @unittest.skipUnless(WITH_COLLECT_STATS, "WITH_COLLECT_STATS is false")
    def test_collect_stats_env(self):
        for dtype in TEST_DTYPES:
            emb, labels = small_batch(dtype)
            miner = SharedCharacteristicsMiner(collect_stats=WITH_COLLECT_STATS)
            self.check_stats(miner, emb, labels)

    def test_collect_stats_explicit(self):
        for dtype in TEST_DTYPES:
            emb, labels = small_batch(dtype)
            for strategy in ("standard", "full", "random"):
                miner = SharedCharacteristicsMiner(
                    strategy=strategy, triplets_per_anchor=3, collect_stats=True
                )
                self.check_stats(miner, emb, labels)
                self.assertIn("avg_anchor_positive_dist", miner._record_these_stats)

    def test_no_stats_by_default(self):
        emb, labels = small_batch(torch.float32)
        miner = SharedCharacteristicsMiner(collect_stats=False)
        miner(emb, labels)
        self.assertFalse(hasattr(miner, "avg_anchor_positive_dist"))
        self.assertFalse(hasattr(miner, "avg_anchor_negative_dist"))


if __name__ == "__main__":
    unittest.main()
