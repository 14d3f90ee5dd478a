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

from state.training.checkpoint_io import AtomicCheckpointIO
from state.training.exact_resume import ExactResume
from state.training.preemption import PreemptionCheckpoint, fit_or_stop
from state.training.progress_bar import StateProgressBar
from state.training.runlock import RunDirLockCallback
from state.utils.progress import progress_enabled

__all__ = ["TrainerSetup", "build_trainer", "fit_or_stop", "precision_for", "strategy_for"]


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


def strategy_for(requested: Any, *, find_unused_parameters: bool = False, timeout_s: int | None = None) -> Any:
    """Lightning's strategy for ``requested``; only ``"ddp"`` is refined.

    DDP refuses parameters that get no gradient unless told to look for them
    (``find_unused_parameters``); ``timeout_s`` sets how long processes wait for each other. No
    backend is named: Lightning uses nccl on CUDA and gloo on CPU.
    """
    if requested != "ddp":
        return requested
    if timeout_s is None:
        return "ddp_find_unused_parameters_true" if find_unused_parameters else "ddp"
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=find_unused_parameters,
                       timeout=datetime.timedelta(seconds=timeout_s))


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
