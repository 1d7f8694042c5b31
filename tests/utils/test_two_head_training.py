"""PML's CascadedEmbeddings (unchanged) training a TwoHeadEmbedder, Sharing Matters style."""

import logging
import unittest

import numpy as np
import torch
from pytorch_metric_learning import losses, trainers
from pytorch_metric_learning.utils import common_functions as c_f

from pml_proxysynth.losses import ProxySynthesisLoss
from pml_proxysynth.miners import SharedCharacteristicsMiner
from pml_proxysynth.utils import TwoHeadEmbedder

from .. import TEST_DEVICE, TEST_DTYPES


class RecordingMiner(SharedCharacteristicsMiner):
    """Keeps a copy of every input and output of ``mine``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        out = super().mine(embeddings, labels, ref_emb, ref_labels)
        self.calls.append((embeddings.detach().clone(), labels.clone(), out))
        return out


class RecordingMarginLoss(losses.MarginLoss):
    """Keeps the indices_tuple and the (unweighted) value of every call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def forward(self, embeddings, labels=None, indices_tuple=None, *args, **kwargs):
        loss = super().forward(embeddings, labels, indices_tuple, *args, **kwargs)
        self.calls.append((indices_tuple, loss.detach().clone()))
        return loss


def toy_dataset(num_classes=6, per_class=12, dim=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = centres[labels] + torch.randn(len(labels), dim, generator=g)
    return x, labels


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class TestTwoHeadTraining(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        c_f.LOGGER.setLevel(logging.ERROR)
        cls.x, cls.labels = toy_dataset()
        cls.num_classes = int(cls.labels.max()) + 1
        # tiny tensors: extra intra-op threads only cost time (a lot on a busy CPU)
        cls.num_threads = torch.get_num_threads()
        torch.set_num_threads(1)

    @classmethod
    def tearDownClass(cls):
        torch.set_num_threads(cls.num_threads)

    def run_two_heads(
        self, dtype, class_loss, iterations=6, class_size=8, shared_size=4
    ):
        C = self.num_classes
        trunk = torch.nn.Linear(self.x.shape[1], 16)
        embedder = TwoHeadEmbedder(16, class_size=class_size, shared_size=shared_size)
        shared_loss = RecordingMarginLoss(learn_beta=True, num_classes=C)
        miner = RecordingMiner(strategy="standard", cutoff=0.5, triplets_per_anchor=1)
        models = {"trunk": trunk, "embedder": embedder}
        loss_funcs = {"metric_loss_0": class_loss, "metric_loss_1": shared_loss}
        for m in list(models.values()) + list(loss_funcs.values()):
            m.to(TEST_DEVICE, dtype)
        optimizers = {
            "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=1e-2),
            "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=1e-2),
            "metric_loss_0_optimizer": torch.optim.Adam(
                class_loss.parameters(), lr=1e-2
            ),
            "metric_loss_1_optimizer": torch.optim.Adam(
                shared_loss.parameters(), lr=5e-2
            ),
        }
        full_embeddings = []
        embedder.register_forward_hook(
            lambda module, inputs, output: full_embeddings.append(
                output.detach().clone()
            )
        )
        recorded_losses = []
        trainer = trainers.CascadedEmbeddings(
            embedder.embedding_sizes,
            models=models,
            optimizers=optimizers,
            batch_size=24,
            loss_funcs=loss_funcs,
            mining_funcs={"tuple_miner_1": miner},
            dataset=torch.utils.data.TensorDataset(self.x.to(dtype), self.labels),
            iterations_per_epoch=iterations,
            data_device=TEST_DEVICE,
            dtype=dtype,
            loss_weights={"metric_loss_0": 1, "metric_loss_1": 0.3},
            dataloader_num_workers=0,
            end_of_iteration_hook=lambda t: recorded_losses.append(dict(t.losses)),
        )
        before = {
            k: snapshot(m) for k, m in list(models.items()) + list(loss_funcs.items())
        }
        trainer.train(1, 1)
        after = {
            k: snapshot(m) for k, m in list(models.items()) + list(loss_funcs.items())
        }
        return (
            trainer,
            miner,
            shared_loss,
            full_embeddings,
            recorded_losses,
            before,
            after,
        )

    def check_run(self, dtype, class_loss, class_param):
        iterations, class_size, shared_size = 6, 8, 4
        trainer, miner, shared_loss, full_embeddings, recorded, before, after = (
            self.run_two_heads(dtype, class_loss, iterations, class_size, shared_size)
        )
        self.assertEqual(len(miner.calls), iterations)
        self.assertEqual(len(full_embeddings), iterations)
        num_triplets = 0
        for (emb, labels, (a, p, n)), full in zip(miner.calls, full_embeddings):
            # the miner sees the shared slice of this iteration's embedding
            self.assertEqual(emb.shape[1], shared_size)
            self.assertTrue(torch.equal(emb, full[:, class_size:]))
            # every triplet has three pairwise different classes
            la, lp, ln = labels[a], labels[p], labels[n]
            self.assertTrue(torch.all((la != lp) & (la != ln) & (lp != ln)))
            num_triplets += len(a)
        self.assertGreater(num_triplets, iterations * 10)
        # the shared loss receives exactly the mined triplets, weighted by 0.3
        self.assertEqual(len(shared_loss.calls), iterations)
        for (_, _, mined), (received, value), losses_ in zip(
            miner.calls, shared_loss.calls, recorded
        ):
            self.assertIs(received, mined)
            self.assertTrue(torch.isclose(losses_["metric_loss_1"], 0.3 * value))
            self.assertTrue(
                torch.isclose(
                    losses_["total_loss"],
                    losses_["metric_loss_0"] + losses_["metric_loss_1"],
                )
            )
        # every trained part moved
        for key, name in [
            ("trunk", "weight"),
            ("embedder", "class_head.weight"),
            ("embedder", "shared_head.weight"),
            ("metric_loss_0", class_param),
            ("metric_loss_1", "beta"),
        ]:
            self.assertFalse(torch.equal(before[key][name], after[key][name]), name)
            self.assertTrue(torch.isfinite(after[key][name]).all(), name)

    def test_proxy_anchor_and_shared_margin(self):
        for dtype in TEST_DTYPES:
            if dtype == torch.float16:
                continue  # no half-precision training on CPU
            torch.manual_seed(0)
            np.random.seed(0)
            class_loss = losses.ProxyAnchorLoss(self.num_classes, 8)
            self.check_run(dtype, class_loss, "proxies")

    def test_proxy_synthesis_and_shared_margin(self):
        for dtype in TEST_DTYPES:
            if dtype == torch.float16:
                continue  # no half-precision training on CPU
            torch.manual_seed(0)
            np.random.seed(0)
            class_loss = ProxySynthesisLoss(losses.ProxyAnchorLoss(self.num_classes, 8))
            self.check_run(dtype, class_loss, "loss.proxies")


if __name__ == "__main__":
    unittest.main()
