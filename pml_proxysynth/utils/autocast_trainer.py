"""Mixed-precision training for PML's trainers: autocast and an optional GradScaler."""

from typing import Optional, Type

import torch
from pytorch_metric_learning.trainers import BaseTrainer


class AutocastTrainerMixin:
    """Runs a PML trainer's forward pass and losses under ``torch.autocast``.

    Mix it in before a PML trainer class (or use ``with_autocast``). ``amp_dtype`` is the
    autocast dtype on the device of ``data_device`` (bfloat16 on CPU, float16 on CUDA are
    the usual choices); None turns autocast off. ``grad_scaler`` (a ``torch.amp.GradScaler``,
    for float16) scales the loss before ``backward`` and steps the optimizers through it,
    so gradients that overflow skip the step instead of corrupting the weights. Everything
    else is the PML trainer, unchanged.
    """

    def __init__(
        self,
        *args,
        amp_dtype: Optional[torch.dtype] = None,
        grad_scaler: Optional["torch.amp.GradScaler"] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if grad_scaler is not None and self.gradient_clippers:
            raise ValueError(
                "grad_scaler with gradient_clippers is not supported: the clippers "
                "would see scaled gradients"
            )
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler

    def calculate_loss(self, curr_batch):
        device_type = torch.device(self.data_device).type
        with torch.autocast(
            device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            super().calculate_loss(curr_batch)

    def backward(self):
        if self.grad_scaler is None:
            return super().backward()
        self.grad_scaler.scale(self.losses["total_loss"]).backward()

    def step_optimizers(self):
        if self.grad_scaler is None:
            return super().step_optimizers()
        # the trainer's own step_optimizers picks what to step (freeze_these, or a
        # trainer that steps some optimizers only); each step goes through the scaler
        optimizers = self.optimizers
        scaled = {k: _ScaledStep(v, self.grad_scaler) for k, v in optimizers.items()}
        self.optimizers = scaled
        try:
            super().step_optimizers()
        finally:
            self.optimizers = optimizers
        if any(s.stepped for s in scaled.values()):
            self.grad_scaler.update()


class _ScaledStep:
    """Stands in for an optimizer while a trainer steps: ``step()`` goes through the
    GradScaler. An optimizer none of whose parameters has a gradient (e.g. a margin
    loss's betas when the miner found no tuple) is skipped, where GradScaler.step would
    raise and the plain optimizer.step() of PML's trainers does nothing."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler"
    ):
        self.optimizer = optimizer
        self.scaler = scaler
        self.stepped = False

    def step(self) -> None:
        groups = self.optimizer.param_groups
        if any(p.grad is not None for g in groups for p in g["params"]):
            self.scaler.step(self.optimizer)
            self.stepped = True

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)


def with_autocast(trainer_class: Type[BaseTrainer]) -> Type[BaseTrainer]:
    """``trainer_class`` with ``AutocastTrainerMixin``: same arguments, plus
    ``amp_dtype`` and ``grad_scaler``."""
    return type(
        f"Autocast{trainer_class.__name__}",
        (AutocastTrainerMixin, trainer_class),
        {"__doc__": f"{trainer_class.__name__} under torch.autocast (see the mixin)."},
    )
