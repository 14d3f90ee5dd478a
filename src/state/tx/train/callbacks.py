"""Trainer parts for ``state tx train``: atomic checkpoints, progress, speed and gradient logging, loggers."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, fsync it, then rename it over the target.

    A crash or ``kill -9`` in the middle of a save leaves the previous ``last.ckpt`` intact (plus at
    most a stray ``.last.ckpt.*.tmp`` file, removed by :func:`remove_stale_temp_files`). Loading
    goes through the restricted unpickler, so resuming never runs code from a checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                self.write_checkpoint(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def write_checkpoint(self, checkpoint: dict[str, Any], fh: Any) -> None:
        """Serialise ``checkpoint`` into the open file ``fh`` (a seam for crash tests)."""
        torch.save(checkpoint, fh)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        from state.io.safe_load import safe_torch_load

        return safe_torch_load(path, what="checkpoint", map_location=map_location or "cpu")


def remove_stale_temp_files(checkpoint_dir: Path) -> None:
    """Delete temporary files a killed save left behind."""
    for stray in Path(checkpoint_dir).glob(".*.ckpt.*.tmp"):
        with contextlib.suppress(OSError):
            stray.unlink()
            log.info("removed unfinished checkpoint write %s", stray.name)


# --------------------------------------------------------------------------------------------
# Monitoring
# --------------------------------------------------------------------------------------------


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


class StateProgressBar(TQDMProgressBar):
    """One bar over training steps (not epochs) showing the loss and cells/s."""

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
        speed = next((cb for cb in trainer.callbacks if isinstance(cb, BatchSpeedMonitor)), None)
        if speed is not None and not math.isnan(speed.cells_per_second):
            items["cells/s"] = f"{speed.cells_per_second:,.0f}"
        return items


# --------------------------------------------------------------------------------------------
# Loggers
# --------------------------------------------------------------------------------------------


class RunCSVLogger(CSVLogger):
    """``version_0/metrics.csv`` + ``hparams.yaml``; on resume, rows logged before the resumed step are kept.

    Lightning's CSV writer deletes an existing metrics.csv; arc-state's runs lose their history on
    resume that way. New metric columns are merged by Lightning (the file is rewritten with the union).
    """

    def __init__(self, save_dir: str | Path, name: str, *, keep_rows_before_step: int | None = None) -> None:
        super().__init__(save_dir=str(save_dir), name=name, version=0)
        self._keep_before = keep_rows_before_step

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        kept: list[dict[str, Any]] = []
        header: list[str] = []
        path = Path(self.log_dir) / "metrics.csv"
        if self._keep_before is not None and path.is_file():
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if _row_step(row) < self._keep_before]
        with warnings.catch_warnings():
            # Lightning warns that it will delete metrics.csv; the rows we keep are written back.
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            writer = super().experiment
        if kept:
            writer.metrics = kept + writer.metrics
            writer.metrics_keys = sorted(set(header) | set(writer.metrics_keys))
        return writer


def _row_step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


def _wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


def make_wandb_logger(*, run_name: str, project: str, entity: str | None, save_dir: str | Path,
                      tags: list[str], config: dict[str, Any], run_dir: Path):
    """A W&B logger, or None (with a warning) when W&B is disabled, not logged in or fails to start.

    W&B problems never stop training: CSV metrics are always written.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        log.warning("use_wandb=true but WANDB_MODE=disabled: logging to version_0/metrics.csv only")
        return None
    if mode not in ("offline", "dryrun") and not _wandb_credentials_present():
        log.warning(
            "use_wandb=true but W&B is not logged in (no WANDB_API_KEY or ~/.netrc entry): logging to "
            "version_0/metrics.csv only (run `wandb login`, set WANDB_MODE=offline, or use_wandb=false)"
        )
        return None
    try:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        logger = _SafeWandbLogger(name=run_name, project=project, entity=entity, dir=str(save_dir), tags=tags)
        logger.experiment.config.update(config, allow_val_change=True)
        run_path = getattr(logger.experiment, "path", None)
        if run_path:
            (run_dir / "wandb_path.txt").write_text(f"{run_path}\n")
        return logger
    except Exception as exc:  # any W&B failure: warn and carry on with CSV
        log.warning("W&B could not start (%s); continuing with version_0/metrics.csv only",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def _safe_wandb_class():
    from lightning.pytorch.loggers import WandbLogger

    class SafeWandbLogger(WandbLogger):
        """A WandbLogger whose failures after start-up are logged once and otherwise ignored."""

        _failed = False

        def _guard(self, method: str, *args: Any, **kwargs: Any) -> None:
            if self._failed:
                return
            try:
                getattr(super(), method)(*args, **kwargs)
            except Exception as exc:
                self._failed = True
                log.warning("W&B logging failed (%s); further W&B logging is skipped", exc)

        def log_metrics(self, *args: Any, **kwargs: Any) -> None:
            self._guard("log_metrics", *args, **kwargs)

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            self._guard("log_hyperparams", *args, **kwargs)

        def after_save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            self._guard("after_save_checkpoint", *args, **kwargs)

        def finalize(self, *args: Any, **kwargs: Any) -> None:
            self._guard("finalize", *args, **kwargs)

    return SafeWandbLogger


def _SafeWandbLogger(**kwargs: Any):  # noqa: N802 - reads like the class it builds
    return _safe_wandb_class()(**kwargs)
