import logging
import math
import unittest

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_proxysynth.utils import HeadWeighting, TwoHeadEmbedder, evaluate_heads

from .. import TEST_DEVICE, TEST_DTYPES

METRICS = ("precision_at_1", "mean_average_precision_at_r")


class Slice(torch.nn.Module):
    """The columns start:end of the embedder output (a reference embedder)."""

    def __init__(self, embedder, start, end):
        super().__init__()
        self.embedder, self.start, self.end = embedder, start, end

    def forward(self, x):
        return self.embedder(x)[:, self.start : self.end]


class ManualWeighting(torch.nn.Module):
    """DiVA's z = l2norm(cat(w_cls * e_cls, w_sh * e_sh)) with norms written out; with
    ``normalize_parts=False`` on the raw parts."""

    def __init__(self, embedder, class_size, weights, normalize_parts=True):
        super().__init__()
        self.embedder, self.class_size, self.weights = embedder, class_size, weights
        self.normalize_parts = normalize_parts

    def forward(self, x):
        e = self.embedder(x)
        e_cls, e_sh = e[:, : self.class_size], e[:, self.class_size :]
        if self.normalize_parts:
            e_cls = e_cls / torch.sqrt((e_cls**2).sum(1, keepdim=True))
            e_sh = e_sh / torch.sqrt((e_sh**2).sum(1, keepdim=True))
        z = torch.cat([self.weights[0] * e_cls, self.weights[1] * e_sh], dim=1)
        return z / torch.sqrt((z**2).sum(1, keepdim=True))


class ScaledParts(torch.nn.Module):
    """An embedder whose two parts have very different norms (not unit-norm)."""

    def __init__(self, dim, class_size, shared_size):
        super().__init__()
        self.class_part = torch.nn.Linear(dim, class_size)
        self.shared_part = torch.nn.Linear(dim, shared_size)
        self.embedding_sizes = [class_size, shared_size]

    def forward(self, x):
        return torch.cat([0.01 * self.class_part(x), 100 * self.shared_part(x)], 1)


def make_tester(**kwargs):
    return GlobalEmbeddingSpaceTester(
        dataloader_num_workers=0,
        data_device=TEST_DEVICE,
        accuracy_calculator=AccuracyCalculator(include=METRICS, k="max_bin_count"),
        **kwargs,
    )


class TestHeadWeighting(unittest.TestCase):
    def test_matches_manual_formula(self):
        torch.manual_seed(0)
        for dtype in TEST_DTYPES:
            # unnormalised parts, so normalize_parts matters
            embedder = torch.nn.Linear(6, 7).to(TEST_DEVICE, dtype)
            x = torch.randn(9, 6, device=TEST_DEVICE, dtype=dtype)
            tol = 1e-2 if dtype == torch.float16 else 1e-5
            for weights in [(1, 1), (1, 0.5), (0.5, 1), (2, 0.1)]:
                out = HeadWeighting(embedder, [4, 3], weights)(x)
                correct = ManualWeighting(embedder, 4, weights)(x)
                self.assertEqual(out.shape, (9, 7))
                self.assertTrue(torch.allclose(out, correct, rtol=tol, atol=tol))

    def test_zero_weight_drops_the_part(self):
        torch.manual_seed(0)
        e = torch.randn(5, 7)
        out = HeadWeighting(None, [4, 3], (1, 0))(e)
        self.assertEqual(out.shape, (5, 4))
        self.assertTrue(
            torch.allclose(out, e[:, :4] / e[:, :4].norm(dim=1, keepdim=True))
        )
        out = HeadWeighting(None, [4, 3], (0, 2.0))(e)
        self.assertTrue(
            torch.allclose(out, e[:, 4:] / e[:, 4:].norm(dim=1, keepdim=True))
        )

    def test_without_part_normalization(self):
        e = torch.tensor([[3.0, 4.0, 1.0]])
        out = HeadWeighting(None, [2, 1], (1, 5), normalize_parts=False)(e)
        self.assertTrue(
            torch.allclose(out, torch.tensor([[3.0, 4.0, 5.0]]) / math.sqrt(50))
        )
        out = HeadWeighting(None, [2, 1], (1, 5))(e)
        self.assertTrue(
            torch.allclose(out, torch.tensor([[0.6, 0.8, 5.0]]) / math.sqrt(26))
        )

    def test_validation(self):
        for weights in [(1,), (1, 1, 1), (0, 0), (1, -1), (1, math.nan), (math.inf, 1),
                        ("1", 0.5), (True, 0.5)]:  # fmt: skip
            with self.assertRaises(ValueError, msg=str(weights)):
                HeadWeighting(None, [2, 2], weights)
        with self.assertRaisesRegex(
            ValueError, "normalize_parts must be True or False"
        ):
            HeadWeighting(None, [2, 2], (1, 1), normalize_parts="no")
        weighting = HeadWeighting(None, [2, 2], (np.float32(1), 0))
        self.assertEqual(weighting.weights, [1.0, 0.0])
        with self.assertRaises(ValueError):
            HeadWeighting(None, [2, 2], (1, 1))(torch.randn(3, 5))


class TestEvaluateHeads(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c_f.LOGGER.setLevel(logging.ERROR)
        g = torch.Generator().manual_seed(0)
        num_classes, per_class, dim = 10, 12, 8
        centres = torch.randn(num_classes, dim, generator=g)
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        x = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=g)
        half = len(labels) // 2
        perm = torch.randperm(len(labels), generator=g)
        train, val = perm[:half], perm[half:]
        cls.dataset_dict = {
            "train": torch.utils.data.TensorDataset(x[train], labels[train]),
            "val": torch.utils.data.TensorDataset(x[val], labels[val]),
        }
        torch.manual_seed(0)
        cls.trunk = torch.nn.Linear(dim, 12).to(TEST_DEVICE)
        cls.embedder = TwoHeadEmbedder(12, class_size=6, shared_size=5).to(TEST_DEVICE)

    def test_default_weightings_equal_direct_tester_runs(self):
        results = evaluate_heads(
            make_tester(), self.dataset_dict, 1, self.trunk, self.embedder
        )
        self.assertEqual(set(results), {"concat", "class"})
        tester = make_tester()
        concat = tester.test(self.dataset_dict, 1, self.trunk, self.embedder)
        class_only = tester.test(
            self.dataset_dict, 1, self.trunk, Slice(self.embedder, 0, 6)
        )
        shared_only = tester.test(
            self.dataset_dict, 1, self.trunk, Slice(self.embedder, 6, 11)
        )
        for split in ("train", "val"):
            for metric in METRICS:
                key = f"{metric}_level0"
                self.assertAlmostEqual(
                    results["concat"][split][key], concat[split][key], places=6
                )
                self.assertAlmostEqual(
                    results["class"][split][key], class_only[split][key], places=6
                )
            # the data make the weightings differ, so the comparison above has teeth
            key = "precision_at_1_level0"
            self.assertNotEqual(class_only[split][key], shared_only[split][key])

    def test_default_weightings_hand_the_tester_the_reference_embeddings(self):
        """ "concat" is l2norm(e) and "class" l2norm(e_class) alone (weight exactly 0 for
        the shared part): the embedders the tester gets, compared on one batch."""
        tester = make_tester()
        given = []
        test = tester.test

        def spy(dataset_dict, epoch, trunk, embedder, *args, **kwargs):
            given.append(embedder)
            return test(dataset_dict, epoch, trunk, embedder, *args, **kwargs)

        tester.test = spy
        evaluate_heads(tester, self.dataset_dict, 1, self.trunk, self.embedder)
        features = self.trunk(self.dataset_dict["val"].tensors[0].to(TEST_DEVICE))
        e = self.embedder(features)
        references = {11: F.normalize(e, dim=1), 6: F.normalize(e[:, :6], dim=1)}
        self.assertEqual(len(given), 2)
        with torch.no_grad():
            outputs = {out.shape[1]: out for out in (g(features) for g in given)}
        self.assertEqual(set(outputs), set(references))
        for width, reference in references.items():
            torch.testing.assert_close(
                outputs[width], reference.detach(), atol=1e-6, rtol=0
            )

    def test_embeddings_equal_references(self):
        tester = make_tester()
        data = self.dataset_dict["val"]
        for weights, reference in [
            ((1, 1), self.embedder),
            ((1, 0), Slice(self.embedder, 0, 6)),
            ((1, 0.5), ManualWeighting(self.embedder, 6, (1, 0.5))),
        ]:
            wrapper = HeadWeighting(
                self.embedder, self.embedder.embedding_sizes, weights
            )
            out, labels = tester.get_all_embeddings(data, self.trunk, wrapper)
            correct, correct_labels = tester.get_all_embeddings(
                data, self.trunk, reference
            )
            self.assertTrue(torch.allclose(out, correct, atol=1e-6), weights)
            self.assertTrue(torch.equal(labels, correct_labels))

    def test_weightings_splits_and_hook(self):
        hook_calls = []
        hook = hook_calls.append
        tester = make_tester(end_of_testing_hook=hook)
        splits_to_eval = [("val", ["train", "val"])]
        weightings = {"a": (1, 0.5), "b": (0.5, 1), "shared": (0, 1)}
        results = evaluate_heads(
            tester,
            self.dataset_dict,
            3,
            self.trunk,
            self.embedder,
            weightings=weightings,
            splits_to_eval=splits_to_eval,
        )
        self.assertEqual(list(results), ["a", "b", "shared"])
        self.assertEqual(splits_to_eval, [("val", ["train", "val"])])
        self.assertEqual(hook_calls, [])
        self.assertIs(tester.end_of_testing_hook, hook)
        for name, weights in weightings.items():
            self.assertEqual(set(results[name]), {"val"})
            self.assertEqual(results[name]["val"]["epoch"], 3)
            correct = make_tester().test(
                self.dataset_dict,
                3,
                self.trunk,
                ManualWeighting(self.embedder, 6, weights),
                splits_to_eval=[("val", ["train", "val"])],
            )
            for metric in METRICS:
                key = f"{metric}_level0"
                self.assertAlmostEqual(
                    results[name]["val"][key], correct["val"][key], places=6
                )

    def test_normalize_parts_false_is_passed_on(self):
        """normalize_parts=False weights the raw parts; with parts of very different
        norms this is not the normalised weighting (the comparison has teeth)."""
        torch.manual_seed(2)
        embedder = ScaledParts(12, 6, 5).to(TEST_DEVICE)
        weightings = {"concat": (1, 1), "shared_low": (1, 0.001)}
        results = evaluate_heads(
            make_tester(),
            self.dataset_dict,
            1,
            self.trunk,
            embedder,
            weightings=weightings,
            normalize_parts=False,
        )
        differs = False
        for name, weights in weightings.items():
            raw = make_tester().test(
                self.dataset_dict,
                1,
                self.trunk,
                ManualWeighting(embedder, 6, weights, normalize_parts=False),
            )
            normalised = make_tester().test(
                self.dataset_dict,
                1,
                self.trunk,
                ManualWeighting(embedder, 6, weights),
            )
            for split in ("train", "val"):
                for metric in METRICS:
                    key = f"{metric}_level0"
                    self.assertAlmostEqual(
                        results[name][split][key], raw[split][key], places=6
                    )
                    differs |= abs(raw[split][key] - normalised[split][key]) > 1e-3
        self.assertTrue(differs)

    def test_errors(self):
        with self.assertRaises(ValueError):
            evaluate_heads(
                make_tester(use_trunk_output=True),
                self.dataset_dict,
                1,
                self.trunk,
                self.embedder,
            )
        with self.assertRaises(ValueError):
            evaluate_heads(
                make_tester(), self.dataset_dict, 1, self.trunk, torch.nn.Identity()
            )


if __name__ == "__main__":
    unittest.main()
