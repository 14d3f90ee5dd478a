"""SE training callbacks beyond Lightning's: ``model.ema`` and FLOPs / MFU logging.

``model.ema`` (with ``model.ema_decay``) is, as in arc-state, an exponential moving average of the
*gradients* (a momentum), not of the weights: before every optimizer step each parameter's gradient
is replaced by ``m = decay * m + (1 - decay) * grad`` (m starts at zero, no bias correction). The
averages are callback state, so checkpoints carry them (``callbacks["GradientEMA{...}"]["averages"]``,
one tensor per parameter name, as in ``named_parameters()``) and a resumed run continues them exactly.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from state.training.flops import FlopsMonitor


class GradientEMA(Callback):
    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.averages: dict[str, torch.Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name, param in pl_module.named_parameters():
            if param.grad is None:
                continue
            average = self.averages.get(name)
            if average is None:
                average = self.averages[name] = torch.zeros_like(param.grad)
            elif average.device != param.grad.device or average.dtype != param.grad.dtype:
                average = self.averages[name] = average.to(param.grad)
            average.mul_(self.decay).add_(param.grad, alpha=1.0 - self.decay)
            param.grad.copy_(average)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "averages": {k: v.detach().clone() for k, v in self.averages.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.averages = {k: v.clone() for k, v in state_dict.get("averages", {}).items()}


class SEFlopsMonitor(FlopsMonitor):
    """tx's FLOPs / MFU logging for SE; the counting forward pass must not move the RNG that dropout and
    the data use, so that a run with it is the same run as one without."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        device = pl_module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
