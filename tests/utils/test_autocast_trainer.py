"""AutocastTrainerMixin / with_autocast on PML's MetricLossOnly and CascadedEmbeddings."""

import logging
import unittest

import torch
from pytorch_metric_learning import losses, miners, trainers
from pytorch_metric_learning.utils import common_functions as c_f

from pml_proxysynth.losses import ProxySynthesisLoss
from pml_proxysynth.utils import with_autocast

from .. import TEST_DEVICE

NUM_CLASSES, DIM = 6, 8


class Dataset(torch.utils.data.Dataset):
    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % NUM_CLASSES
        self.data = torch.randn(n, 10, generator=g) + self.labels[:, None].float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.data[i], self.labels[i]


class DtypeSpy(ProxySynthesisLoss):
    """Records the dtype of the embeddings it receives."""

    def forward(self, embeddings, labels=None, *args, **kwargs):
        self.seen = getattr(self, "seen", []) + [embeddings.dtype]
        return super().forward(embeddings, labels, *args, **kwargs)


class InfLoss(losses.BaseMetricLossFunction):
    """A loss whose gradient is inf: a GradScaler must skip the step."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        loss = embeddings.float().sum() * float("inf")
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}  # fmt: skip


class NoTuples(miners.BaseMiner):
    """A miner that finds nothing: the loss's own parameters get no gradient."""

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        empty = torch.tensor([], dtype=torch.long, device=embeddings.device)
        return empty, empty, empty


def build(trainer_class, loss, iterations=3, key="metric_loss", **kwargs):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(10, 16).to(TEST_DEVICE)
    embedder = torch.nn.Linear(16, DIM).to(TEST_DEVICE)
    loss = loss.to(TEST_DEVICE)
    params = list(trunk.parameters()) + list(embedder.parameters())
    optimizers = {
        "trunk_optimizer": torch.optim.SGD(params, lr=0.1),
        f"{key}_optimizer": torch.optim.SGD(loss.parameters(), lr=0.1)
        if list(loss.parameters())
        else None,
    }
    optimizers = {k: v for k, v in optimizers.items() if v is not None}
    c_f.LOGGER.setLevel(logging.WARNING)
    trainer = trainer_class(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=12,
        loss_funcs={key: loss},
        dataset=Dataset(),
        iterations_per_epoch=iterations,
        data_device=TEST_DEVICE,
        dataloader_num_workers=0,
        end_of_iteration_hook=lambda t: t.seen_losses.append(t.losses["total_loss"]),
        **kwargs,
    )
    trainer.seen_losses = []
    return trainer, trunk, embedder, loss


def amp_dtype():
    return torch.float16 if TEST_DEVICE.type == "cuda" else torch.bfloat16


def with_and_without_scaler(trainer_class, **kwargs):
    """The same autocast training set-up (same seed, same proxies) twice: with a
    GradScaler, then without; yields (trainer, trunk, embedder, inner loss)."""
    for scaler in (torch.amp.GradScaler(TEST_DEVICE.type, init_scale=2.0**8), None):
        torch.manual_seed(0)  # the same proxies (build seeds the rest)
        inner = losses.ProxyAnchorLoss(NUM_CLASSES, DIM)
        trainer, trunk, embedder, _ = build(
            with_autocast(trainer_class), ProxySynthesisLoss(inner),
            amp_dtype=amp_dtype(), grad_scaler=scaler, **kwargs,
        )  # fmt: skip
        yield trainer, trunk, embedder, inner


class TestAutocastTrainer(unittest.TestCase):
    def test_losses_run_under_autocast(self):
        inner = losses.ProxyAnchorLoss(NUM_CLASSES, DIM)
        trainer, _, _, loss = build(
            with_autocast(trainers.MetricLossOnly),
            DtypeSpy(inner),
            amp_dtype=amp_dtype(),
        )
        before = inner.proxies.detach().clone()
        trainer.train(num_epochs=1)
        self.assertEqual(set(loss.seen), {amp_dtype()})
        self.assertTrue(all(torch.isfinite(x) for x in trainer.seen_losses))
        self.assertEqual(inner.proxies.dtype, torch.float32)
        self.assertFalse(torch.equal(before, inner.proxies.detach()))

    def test_without_amp_dtype_equals_the_plain_trainer(self):
        results = []
        for trainer_class in (
            trainers.MetricLossOnly,
            with_autocast(trainers.MetricLossOnly),
        ):
            inner = losses.ProxyAnchorLoss(NUM_CLASSES, DIM)
            trainer, trunk, _, _ = build(trainer_class, ProxySynthesisLoss(inner))
            trainer.train(num_epochs=1)
            results.append(
                (trunk.weight.detach().clone(), inner.proxies.detach().clone())
            )
        for a, b in zip(*results):
            self.assertTrue(torch.equal(a, b))

    def test_grad_scaler_skips_overflowing_steps(self):
        scaler = torch.amp.GradScaler(TEST_DEVICE.type, init_scale=2.0**8)
        trainer, trunk, _, _ = build(
            with_autocast(trainers.MetricLossOnly), InfLoss(), iterations=2,
            amp_dtype=amp_dtype(), grad_scaler=scaler,
        )  # fmt: skip
        before = trunk.weight.detach().clone()
        trainer.train(num_epochs=1)
        self.assertTrue(torch.equal(before, trunk.weight.detach()))
        self.assertLess(scaler.get_scale(), 2.0**8)

    def test_grad_scaler_steps_finite_gradients(self):
        """With finite gradients the scaler changes nothing but the scale: the loss is
        scaled by a power of 2 and the gradients unscaled before each step, so the
        weights end where the same autocast trainer without a scaler leaves them."""
        results = []
        for trainer, trunk, _, inner in with_and_without_scaler(
            trainers.CascadedEmbeddings, key="metric_loss_0", embedding_sizes=[DIM]
        ):
            before = (trunk.weight.detach().clone(), inner.proxies.detach().clone())
            trainer.train(num_epochs=1)
            after = (trunk.weight.detach().clone(), inner.proxies.detach().clone())
            for b, a in zip(before, after):
                self.assertFalse(torch.equal(b, a))
            results.append((after, trainer.seen_losses))
        (scaled, scaled_losses), (plain, plain_losses) = results
        self.assertEqual(len(scaled_losses), 3)
        # the recorded losses are the unscaled ones
        torch.testing.assert_close(scaled_losses, plain_losses, rtol=1e-5, atol=1e-6)
        for got, expected in zip(scaled, plain):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    def test_grad_scaler_steps_an_optimizer_whose_parameters_partly_lack_gradients(
        self,
    ):
        """An optimizer that also holds parameters outside the forward pass (an unused
        layer in the trunk's optimizer) is stepped, as by PML's plain step: the trunk
        moves and ends where the run without a scaler leaves it."""
        after = []
        for trainer, trunk, _, _ in with_and_without_scaler(trainers.MetricLossOnly):
            unused = torch.nn.Linear(16, 4).to(TEST_DEVICE)
            trainer.optimizers["trunk_optimizer"].add_param_group(
                {"params": list(unused.parameters())}
            )
            before = trunk.weight.detach().clone()
            trainer.train(num_epochs=1)
            self.assertFalse(torch.equal(before, trunk.weight.detach()))
            after.append(trunk.weight.detach().clone())
        torch.testing.assert_close(after[0], after[1], rtol=1e-5, atol=1e-6)

    def test_grad_scaler_respects_freeze_these(self):
        """As in PML's step_optimizers, the optimizer of a frozen model is not stepped
        (here trunk_optimizer, which also holds the embedder's weights, so those get
        gradients but must stay put); the loss's optimizer still steps, as without
        a scaler."""
        results = []
        for trainer, trunk, embedder, inner in with_and_without_scaler(
            trainers.MetricLossOnly, freeze_these=("trunk",)
        ):
            before = [m.weight.detach().clone() for m in (trunk, embedder)]
            proxies = inner.proxies.detach().clone()
            trainer.train(num_epochs=1)
            self.assertIsNotNone(embedder.weight.grad)
            for b, m in zip(before, (trunk, embedder)):
                self.assertTrue(torch.equal(b, m.weight.detach()))
            self.assertFalse(torch.equal(proxies, inner.proxies.detach()))
            results.append(inner.proxies.detach().clone())
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)

    def test_grad_scaler_with_an_optimizer_without_gradients(self):
        """Without tuples the margin loss's betas get no gradient: their optimizer is
        skipped (PML's plain step does nothing there), the others still step."""
        scaler = torch.amp.GradScaler(TEST_DEVICE.type, init_scale=2.0**8)
        margin = losses.MarginLoss(learn_beta=True, num_classes=NUM_CLASSES)
        trainer, trunk, _, _ = build(
            with_autocast(trainers.MetricLossOnly), margin, amp_dtype=amp_dtype(),
            grad_scaler=scaler, mining_funcs={"tuple_miner": NoTuples()},
        )  # fmt: skip
        before = margin.beta.detach().clone()
        trainer.train(num_epochs=1)
        self.assertTrue(torch.equal(before, margin.beta.detach()))
        self.assertEqual(len(trainer.seen_losses), 3)

    def test_grad_scaler_keeps_the_trainers_own_choice_of_optimizers(self):
        """A trainer that steps some optimizers only (as PML's
        DeepAdversarialMetricLearning does in its generator-alone epochs) keeps doing
        so with a scaler: the scaler steps what the trainer steps."""

        class LossOnlySteps(trainers.MetricLossOnly):
            def step_optimizers(self):
                self.optimizers["metric_loss_optimizer"].step()

        for trainer, trunk, _, inner in with_and_without_scaler(LossOnlySteps):
            before = trunk.weight.detach().clone()
            proxies = inner.proxies.detach().clone()
            trainer.train(num_epochs=1)
            self.assertIsNotNone(trunk.weight.grad)
            self.assertTrue(torch.equal(before, trunk.weight.detach()))
            self.assertFalse(torch.equal(proxies, inner.proxies.detach()))

    def test_grad_scaler_with_clippers_is_rejected(self):
        scaler = torch.amp.GradScaler(TEST_DEVICE.type)
        with self.assertRaisesRegex(ValueError, "gradient_clippers"):
            build(
                with_autocast(trainers.MetricLossOnly), InfLoss(), grad_scaler=scaler,
                gradient_clippers={"trunk_grad_clipper": lambda: None},
            )  # fmt: skip
