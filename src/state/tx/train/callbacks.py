"""Callbacks only ``state tx train`` uses: training speed and gradient-norm logging.

The plumbing both training commands share (checkpoint files, loggers, progress bar, Trainer
construction) lives in :mod:`state.training`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import Callback


def _cells_in(batch: Any) -> int:
    if isinstance(batch, dict):
        emb = batch.get("pert_cell_emb")
        if isinstance(emb, torch.Tensor):
            return int(emb.shape[0])
    return 0


class BatchSpeedMonitor(Callback):
    """Every ``interval`` batches: batches/s, cells/s, batch-time spread and the share of time spent waiting for data.

    ``data_wait_fraction`` near 1 means the loader is the bottleneck (raise num_workers); near 0, compute is.
    """

    def __init__(self, *, interval: int = 50) -> None:
        self.interval = max(1, int(interval))
        self._reset()
        self.cells_per_second = float("nan")
        self._last_end: float | None = None

    def _reset(self) -> None:
        self._times: list[float] = []
        self._waits: list[float] = []
        self._cells = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._waits.append(now - self._last_end)
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._times.append(now - self._start)
        self._cells += _cells_in(batch)
        self._last_end = now
        if len(self._times) >= self.interval:
            self._report(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last_end = None  # time spent validating is not data waiting

    def _report(self, pl_module) -> None:
        times, waits = self._times, self._waits
        total = sum(times) + sum(waits)
        mean = sum(times) / len(times)
        std = math.sqrt(sum((t - mean) ** 2 for t in times) / len(times))
        self.cells_per_second = self._cells / total if total > 0 else float("nan")
        metrics = {
            "batches_per_second": len(times) / total if total > 0 else 0.0,
            "cells_per_second": self.cells_per_second,
            "batch_time_min": min(times),
            "batch_time_max": max(times),
            "batch_time_avg": mean,
            "batch_time_cv_percent": 100.0 * std / mean if mean > 0 else 0.0,
            "batch_time_max_min_ratio": max(times) / min(times) if min(times) > 0 else 0.0,
            "data_wait_fraction": sum(waits) / total if total > 0 else 0.0,
        }
        for key, value in metrics.items():
            pl_module.log(key, float(value), on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)
        self._reset()


class GradientNormLogger(Callback):
    """Logs ``train/gradient_norm`` (L2 norm of all gradients, before clipping) on logging steps."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        pl_module.log("train/gradient_norm", norm, on_step=True, on_epoch=False)
