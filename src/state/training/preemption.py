"""Stopping cleanly when a scheduler asks: SIGTERM / SIGUSR1 -> last.ckpt at the next step, then exit.

SLURM sends SIGUSR1 (with ``#SBATCH --signal=SIGUSR1@90``) or SIGTERM shortly before it kills,
preempts or requeues a job. :class:`PreemptionCheckpoint` notes the signal, and at the next
training-step boundary writes ``last.ckpt`` and stops the Trainer; the command then raises
:class:`RunPreempted`, whose exit status is 128 + the signal number (143 for SIGTERM, 138 for
SIGUSR1, the shell's convention for "killed by that signal") or ``STATE_PREEMPT_EXIT_CODE``. Running
the same command again resumes from that ``last.ckpt``.

It works beside Lightning's own handling instead of replacing it: the handlers are installed at
``on_train_start``, after Lightning installed its own, and are removed at ``teardown``. The SIGUSR1
handler calls the one it replaces; SIGTERM is kept from Lightning while training (Lightning would
abort a validation in progress, and a resumed run would then skip it), so a SIGTERM during a long
validation stops after that validation. Under
SLURM with Lightning's auto-requeue (its default in batch jobs) Lightning's SIGUSR1 handler still
writes its ``hpc_ckpt_N.ckpt`` and runs ``scontrol requeue``; the requeued job resumes from our
``last.ckpt``, which is at least as recent (our commands pass it to ``fit`` explicitly, so
Lightning's HPC checkpoint is only used when no ``last.ckpt`` exists). Lightning's own SIGTERM
check (``trainer.received_sigterm``) raises ``SIGTERMException`` after the step; :func:`fit_or_stop`
turns that into :class:`RunPreempted` too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from state.utils.errors import StateError

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def preempt_exit_code(signum: int) -> int:
    """The exit status after a preemption signal: ``STATE_PREEMPT_EXIT_CODE`` or 128 + signal number."""
    configured = os.environ.get("STATE_PREEMPT_EXIT_CODE")
    return int(configured) if configured else 128 + int(signum)


class RunPreempted(StateError):
    """Training stopped on a scheduler's signal after writing its checkpoint; rerun to resume."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        name = signal.Signals(signum).name
        where = f"{checkpoint} written" if checkpoint else "no checkpoint could be written"
        super().__init__(f"training stopped by {name} after step {step}; {where}",
                         hint="run the same command again to resume")
        self.exit_code = preempt_exit_code(signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class PreemptionCheckpoint(Callback):
    """After SIGTERM or SIGUSR1: write ``checkpoint`` at the next step boundary and stop training.
    """

    def __init__(self, checkpoint: str | os.PathLike | None) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.signum: int | None = None  # the signal received
        self.stopped_at: int | None = None  # global step of the checkpoint written on the signal
        self._previous: dict[int, Any] = {}

    # -- signals
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.signum, self.stopped_at = None, None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in PREEMPT_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            log.warning("received %s: writing a checkpoint at the end of this step, then stopping",
                        signal.Signals(signum).name)
        self.signum = signum
        previous = self._previous.get(signum)
        # SIGUSR1: Lightning's SLURM requeue handler (when installed) still runs. SIGTERM is not passed
        # on while training: Lightning would abort a running validation and skip it on resume.
        if signum != signal.SIGTERM and callable(previous):
            previous(signum, frame)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips teardown hooks when fit fails

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal and previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    # -- the step boundary
    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        signalled = self.signum is not None or bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:  # every rank stops at the same step (the signal may reach one rank)
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if not signalled or self.stopped_at is not None:
            return
        if self.signum is None:
            self.signum = int(signal.SIGTERM)
        if _validation_follows(trainer):
            # Lightning skips a validation it finds pending on resume: let it run, then stop.
            self._after_validation = True
            return
        self._stop(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(self, "_after_validation", False) and not trainer.sanity_checking:
            self._after_validation = False
            self._stop(trainer)

    def _stop(self, trainer: Any) -> None:
        if self.checkpoint is not None:
            trainer.save_checkpoint(str(self.checkpoint), weights_only=False)
        self.stopped_at = int(trainer.global_step)
        trainer.should_stop = True

    def preempted(self) -> RunPreempted | None:
        if self.stopped_at is None or self.signum is None:
            return None
        return RunPreempted(self.signum, self.stopped_at, self.checkpoint)


def _validation_follows(trainer: Any) -> bool:
    """Whether Lightning runs validation after the current training batch (its own rule)."""
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    check = getattr(trainer.fit_loop.epoch_loop, "_should_check_val_fx", None)
    try:
        return bool(check(fetcher)) if check is not None and fetcher is not None else False
    except Exception:  # a Lightning version without this rule: stop at once
        return False


def fit_or_stop(trainer: Any, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit(...)``; raises :class:`RunPreempted` when a scheduler's signal stopped it."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    callback = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
    try:
        trainer.fit(*args, **kwargs)
    except SIGTERMException:
        if callback is None or callback.preempted() is None:
            raise RunPreempted(int(signal.SIGTERM), int(trainer.global_step), None) from None
    stopped = callback.preempted() if callback is not None else None
    if stopped is not None:
        raise stopped
