"""The README's Python snippets: every block is valid Python, and the usage snippets run as
written on toy data. Only what the README leaves to the user is filled in (the trunk, the
datasets, the accuracy calculator) and the training is cut to a few iterations; a snippet
that no longer matches the package's API fails here."""

import contextlib
import os
import re
import tempfile
import unittest
from pathlib import Path
from typing import Dict, List

import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

README = Path(__file__).resolve().parents[1] / "README.md"
IN_DIM = 16


def python_blocks() -> List[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def block_with(marker: str) -> str:
    """The one python block of the README that contains ``marker``."""
    blocks = [b for b in python_blocks() if marker in b]
    assert len(blocks) == 1, f"{len(blocks)} README python blocks contain {marker!r}"
    return blocks[0]


def replaced(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"the README snippet no longer contains {old!r}"
    return code.replace(old, new)


def toy_dataset(num_classes: int = 100, per_class: int = 4):
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = torch.randn(len(labels), IN_DIM)
    return torch.utils.data.TensorDataset(features, labels), labels


def train_briefly(namespace: Dict[str, object]) -> None:
    """The snippet's trainer, two iterations, without dataloader worker processes."""
    trainer = namespace["trainer"]
    trainer.iterations_per_epoch = 2
    trainer.dataloader_num_workers = 0
    trainer.train(num_epochs=1)


def parameters_of(module: torch.nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def all_changed(before: List[torch.Tensor], module: torch.nn.Module) -> bool:
    after = list(module.parameters())
    return len(before) > 0 and all(
        not torch.equal(b, a.detach()) for b, a in zip(before, after)
    )


class TestReadmeSnippets(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_every_python_block_compiles(self):
        blocks = python_blocks()
        self.assertGreaterEqual(len(blocks), 7)
        for block in blocks:
            with self.subTest(block=block.splitlines()[0]):
                compile(block, str(README), "exec")

    def test_proxy_anchor_snippet_trains_the_wrapped_proxies(self):
        code = block_with("trainers.MetricLossOnly(")
        code = replaced(code, "trainer.train(num_epochs=50)", "")
        dataset, labels = toy_dataset()
        namespace = {
            "trunk": torch.nn.Linear(IN_DIM, 64),
            "embedder": torch.nn.Linear(64, 512),
            "train_dataset": dataset,
            "train_labels": labels,
        }
        exec(code, namespace)
        loss = namespace["loss"]
        before = parameters_of(loss)
        train_briefly(namespace)
        self.assertTrue(all_changed(before, loss))
        self.assertTrue(all_changed(before, loss.loss))  # the inner loss's proxies

    def test_two_head_snippets_train_evaluate_and_decorrelate(self):
        dataset, labels = toy_dataset()
        test_dataset, _ = toy_dataset(num_classes=10)
        namespace = {
            "train_dataset": dataset,
            "train_labels": labels,
            "test_dataset": test_dataset,
            "epoch": 1,
            "calculator": AccuracyCalculator(include=("precision_at_1",), k=1),
            "toy_trunk": torch.nn.Linear(IN_DIM, 2048),
        }
        # training with CascadedEmbeddings: both heads' losses learn
        code = block_with("trainers.CascadedEmbeddings(")
        code = replaced(code, "trunk = ...", "trunk = toy_trunk")
        code = replaced(code, "trainer.train(num_epochs=...)", "")
        exec(code, namespace)
        loss_funcs = namespace["loss_funcs"]
        before = {name: parameters_of(loss) for name, loss in loss_funcs.items()}
        train_briefly(namespace)
        for name, loss in loss_funcs.items():
            with self.subTest(loss=name):
                self.assertTrue(all_changed(before[name], loss))

        # evaluation of the weightings
        code = block_with("evaluate_heads(")
        code = replaced(
            code, "accuracy_calculator=...", "accuracy_calculator=calculator"
        )
        with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
            exec(code, namespace)  # the tester saves nothing without a record keeper
        accuracies = namespace["accuracies"]
        self.assertEqual(set(accuracies), {"concat", "class", "more_shared"})
        for name, by_split in accuracies.items():
            with self.subTest(weighting=name):
                self.assertTrue(0 <= by_split["test"]["precision_at_1_level0"] <= 1)

        # decorrelation: the regressor, which no other loss touches, learns
        exec(block_with("DecorrelatedCascadedEmbeddings("), namespace)
        decorrelation = namespace["loss_funcs"]["decorrelation_loss"]
        before = parameters_of(decorrelation)
        train_briefly(namespace)
        self.assertTrue(all_changed(before, decorrelation))

    def test_reuse_snippet_builds_hooks_and_calculator(self):
        from pytorch_metric_learning.utils.logging_presets import HookContainer

        namespace: Dict[str, object] = {}
        with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
            exec(block_with("build_hooks("), namespace)
            self.assertTrue(os.path.isdir(os.path.join("runs", "mine", "records")))
        self.assertIsInstance(namespace["hooks"], HookContainer)
        self.assertIsInstance(namespace["calculator"], AccuracyCalculator)


if __name__ == "__main__":
    unittest.main()
