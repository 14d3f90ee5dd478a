"""One way to build a Lightning Trainer for ``tx train`` and ``emb fit``.

A command describes its run in a :class:`TrainerSetup` (where it writes, on which devices, its own
callbacks, loggers and checkpoint reader/writer) and passes its training-loop settings (lengths,
validation cadence, clipping, ...) as keyword arguments. This module adds what every run shares:
the accelerator, the precision and strategy policies, the progress bar and the checkpoint IO plugin.

Run-level features that both commands get are assembled in :func:`_layer_callbacks` /
:func:`_layer_plugins`: the preemption handler (SIGTERM / SIGUSR1 -> ``last.ckpt`` at the next step,
then :class:`~state.training.preemption.RunPreempted`; run ``fit`` through :func:`fit_or_stop`) and
the lock on the run directory (``TrainerSetup.lock_dir``, held from ``setup`` to ``teardown``).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy

from state.training.checkpoint_io import AtomicCheckpointIO
from state.training.exact_resume import ExactResume
from state.training.preemption import PreemptionCheckpoint, fit_or_stop
from state.training.progress_bar import StateProgressBar
from state.training.runlock import RunDirLockCallback
from state.utils.progress import progress_enabled

__all__ = ["StateDDPStrategy", "TrainerSetup", "build_trainer", "fit_or_stop", "precision_for", "process_count",
           "strategy_for"]


@dataclass
class TrainerSetup:
    """What a command decides about its Trainer, apart from the training loop's settings."""

    root_dir: Path  # Lightning's default_root_dir
    devices: Any = 1  # devices per node: an int, a list of indices or "auto"
    num_nodes: int = 1
    strategy: Any = "auto"  # see strategy_for
    precision: str | None = None  # None: precision_for's automatic choice
    loggers: Sequence[Logger] = ()
    callbacks: Sequence[Callback] = ()  # the command's own (checkpoint naming, monitors, ...)
    checkpoint_io: AtomicCheckpointIO = field(default_factory=AtomicCheckpointIO)
    step_progress_bar: bool = True  # StateProgressBar; False keeps Lightning's per-epoch bars
    last_checkpoint: Path | None = None  # written on SIGTERM / SIGUSR1 (None: stop without writing)
    lock_dir: Path | None = None  # the folder one job at a time may train in (None: no lock)
    lock_what: str = "run directory"  # how the lock's error message names that folder


def precision_for(requested: str | None) -> str:
    """``requested`` when given; otherwise bf16-mixed on GPUs with bf16, 16-mixed on older GPUs, 32-true on CPU."""
    if requested:
        return requested
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def process_count(devices: Any, num_nodes: Any = 1) -> int:
    """How many training processes ``devices`` (per node) x ``num_nodes`` start, as Lightning counts them."""
    if isinstance(devices, list | tuple):
        per_node = len(devices)
    elif str(devices).strip().lstrip("-").isdigit() and int(devices) >= 0:
        per_node = int(devices)
    elif "," in str(devices):  # "0,1": device indices
        per_node = len([d for d in str(devices).split(",") if d.strip()])
    else:  # "auto" / -1: every GPU of the node, one process on CPU
        per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return max(1, per_node) * max(1, int(num_nodes or 1))


def strategy_for(requested: Any, *, processes: int = 1, find_unused_parameters: bool = False,
                 timeout_s: int | None = None) -> Any:
    """Lightning's strategy for ``requested``; ``"ddp"`` (and ``"auto"`` over several processes) is refined.

    ``auto`` with several processes becomes ddp, so it gets the same handling as a ddp request
    (Lightning's own auto choice would skip it). DDP refuses parameters that get no gradient unless
    told to look for them (``find_unused_parameters``); ``timeout_s`` sets how long processes wait
    for each other; buffers are broadcast only when the model has some that training changes (see
    :class:`StateDDPStrategy`). No backend is named: Lightning uses nccl on CUDA and gloo on CPU.
    """
    if requested == "auto" and processes > 1:
        requested = "ddp"
    if requested != "ddp":
        return requested
    extra = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    return StateDDPStrategy(find_unused_parameters=find_unused_parameters, **extra)


class StateDDPStrategy(DDPStrategy):
    """Lightning's DDP, with ``broadcast_buffers`` off unless the model keeps running statistics.

    By default DDP broadcasts rank 0's buffers at every forward, validation included: a collective
    per batch, which hangs when the ranks run different numbers of validation batches (one rank gets
    none). Buffers only differ between ranks when training updates them (BatchNorm's running
    statistics); models without such layers skip the broadcast.
    """

    def _setup_model(self, model: torch.nn.Module) -> Any:
        self._ddp_kwargs.setdefault("broadcast_buffers", buffers_need_sync(model))
        return super()._setup_model(model)


def buffers_need_sync(model: torch.nn.Module) -> bool:
    """Whether some layer of ``model`` updates buffers while training (BatchNorm running statistics)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


def build_trainer(setup: TrainerSetup, **loop: Any) -> Trainer:
    """The Trainer for ``setup``; ``loop`` holds the command's training-loop settings (Trainer keywords)."""
    show_bar = progress_enabled()
    return Trainer(
        accelerator="auto",
        devices=setup.devices,
        num_nodes=setup.num_nodes,
        strategy=setup.strategy,
        precision=precision_for(setup.precision),
        logger=list(setup.loggers),
        callbacks=_layer_callbacks(setup, show_bar=show_bar),
        plugins=_layer_plugins(setup),
        enable_progress_bar=show_bar,
        default_root_dir=str(setup.root_dir),
        **loop,
    )


def _layer_callbacks(setup: TrainerSetup, *, show_bar: bool) -> list[Callback]:
    callbacks = list(setup.callbacks)
    if setup.lock_dir is not None:
        callbacks.append(RunDirLockCallback(setup.lock_dir, what=setup.lock_what))
    # ExactResume first: its per-step bookkeeping must be done when the preemption handler saves.
    callbacks.append(ExactResume())
    callbacks.append(PreemptionCheckpoint(setup.last_checkpoint))
    if show_bar and setup.step_progress_bar:
        callbacks.append(StateProgressBar())
    return callbacks


def _layer_plugins(setup: TrainerSetup) -> list:
    return [setup.checkpoint_io]
