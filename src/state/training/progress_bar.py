"""The training progress bar: one bar over optimizer steps, showing the loss and the training speed.

Whether a bar is shown at all is :func:`state.utils.progress.progress_enabled`'s decision.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class StateProgressBar(TQDMProgressBar):
    """One bar over training steps (not epochs) showing the loss and cells/s.

    The speed comes from any callback that exposes ``cells_per_second`` (tx's BatchSpeedMonitor).
    """

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.set_description("train")
        return bar

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if self.train_progress_bar is None:
            return
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.train_progress_bar.total = max_steps
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        if self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # one bar for the whole run; closed in on_train_end

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            items["loss"] = f"{float(loss):.4g}"
        speed = _cells_per_second(trainer.callbacks)
        if not math.isnan(speed):
            items["cells/s"] = f"{speed:,.0f}"
        return items


def _cells_per_second(callbacks: list) -> float:
    for callback in callbacks:
        speed = getattr(callback, "cells_per_second", None)
        if isinstance(speed, float):
            return speed
    return float("nan")
