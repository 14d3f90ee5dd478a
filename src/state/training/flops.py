"""FLOPs accounting during training: ``cumulative_flops`` always, MFU when ``training.use_mfu``.

The FLOPs of one training step are counted once, on the first batch, with PyTorch's flop
counter over a no-grad forward pass (backward is counted as twice the forward, the usual
estimate, when ``cumulative_flops_use_backward`` / ``mfu_kwargs.use_backward`` is set). From then
on each step adds that figure. Counting must never stop a run: any failure only disables it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def count_forward_flops(module: torch.nn.Module, batch: Any) -> int:
    """FLOPs of ``module(batch)`` (training layout), counted without building a graph."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(batch)
    return int(counter.get_total_flops())


class FlopsMonitor(Callback):
    """Logs ``cumulative_flops`` every step and, with ``mfu_kwargs``, ``flops_per_batch`` and ``mfu (%)``."""

    def __init__(self, *, use_backward: bool = True, mfu_kwargs: dict | None = None) -> None:
        self.use_backward = use_backward
        self.mfu = dict(mfu_kwargs) if mfu_kwargs else None
        self.flops_per_batch: int | None = None
        self._disabled = False
        window = int((self.mfu or {}).get("window_size", 2) or 2)
        self._times: deque[float] = deque(maxlen=max(2, window + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.flops_per_batch is not None or self._disabled:
            return
        try:
            forward = count_forward_flops(pl_module, batch)
        except Exception as exc:  # noqa: BLE001 - counting is best effort and must not stop training
            log.debug("FLOPs counting disabled: %s", exc)
            self._disabled = True
            return
        use_backward = self.use_backward if self.mfu is None else bool(self.mfu.get("use_backward", True))
        self.flops_per_batch = forward * (3 if use_backward else 1)
        log.info("FLOPs per training step: %.3g", self.flops_per_batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.flops_per_batch is None:
            return
        step = trainer.global_step
        metrics = {"cumulative_flops": float(self.flops_per_batch * step)}
        self._times.append(time.perf_counter())
        if self.mfu is not None:
            metrics["flops_per_batch"] = float(self.flops_per_batch)
            interval = int(self.mfu.get("logging_interval", 10) or 10)
            available = float(self.mfu.get("available_flops", 0) or 0)
            if available > 0 and len(self._times) >= 2 and step % interval == 0:
                elapsed = (self._times[-1] - self._times[0]) / (len(self._times) - 1)
                if elapsed > 0:  # per GPU: this rank's FLOPs over one device's peak (each rank runs its own batch)
                    metrics["mfu (%)"] = 100.0 * self.flops_per_batch / elapsed / available
        if "mfu (%)" in metrics or _logger_writes_this_step(trainer):
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, prog_bar=False, sync_dist=False)


def _logger_writes_this_step(trainer) -> bool:
    # Step metrics reach metrics.csv only every log_every_n_steps; logging them on the other steps
    # cost ~1 ms per step of Lightning bookkeeping for nothing. Unknown Lightning internals: log.
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
