"""Stopping cleanly when a scheduler asks: SIGTERM / SIGUSR1 -> last.ckpt at the next step, then exit.

SLURM sends SIGUSR1 (with ``#SBATCH --signal=SIGUSR1@90``) or SIGTERM shortly before it kills,
preempts or requeues a job. :class:`PreemptionCheckpoint` notes the signal, and at the next
training-step boundary writes ``last.ckpt`` and stops the Trainer; the command then raises
:class:`RunPreempted`, whose exit status is 128 + the signal number (143 for SIGTERM, 138 for
SIGUSR1, the shell's convention for "killed by that signal") or ``STATE_PREEMPT_EXIT_CODE``. Running
the same command again resumes from that ``last.ckpt``.

It works beside Lightning's own handling instead of replacing it: the handlers are installed when
Lightning has installed its own (before the sanity check, or at ``on_train_start`` without one) and
are removed at ``teardown``. A SIGUSR1 handler of the user's is still called. SIGTERM is kept from
Lightning while training (Lightning would abort a validation in progress, and a resumed run would
then skip it), so a SIGTERM during a long validation stops after that validation. Lightning's own
SIGTERM check (``trainer.received_sigterm``) raises ``SIGTERMException`` after the step;
:func:`fit_or_stop` turns that into :class:`RunPreempted` too.

SLURM requeue: in a SLURM batch job Lightning installs a SIGUSR1 handler that, at the moment the
signal arrives (possibly in the middle of an optimizer step), writes ``hpc_ckpt_N.ckpt`` and runs
``scontrol requeue``, which makes SLURM end the job soon after. That checkpoint may hold a
half-updated step, costs one more full write per requeue, and the requeue races our own checkpoint.
So that handler is held back: :func:`requeue_slurm_job` runs the same ``scontrol requeue <job>``
once ``last.ckpt`` is on disk, and the requeued job resumes from it (our commands pass it to ``fit``).

Several ranks: the signal may reach some ranks only (or at different steps), and every rank must stop
at the same step, so the ranks agree on it. Agreeing is a collective; done on every batch it would make
each host wait for the others (and, on a device tensor, for its GPU) once per step. So the ranks compare
notes only on optimizer steps that are multiples of ``STATE_PREEMPT_CHECK_EVERY`` (default
:data:`CHECK_EVERY`; the same steps on every rank since they share ``global_step``), over a CPU (gloo)
group even when training uses nccl: the exchange waits for the other hosts, never for a GPU. The stop
comes at most that many steps after the signal. DataLoader workers ignore the signal
(:mod:`state.utils.worker_signals`), so a signal to the whole process group reaches the decision here.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from state.utils.errors import StateError

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECK_EVERY = 10  # optimizer steps between the ranks' agreements (STATE_PREEMPT_CHECK_EVERY)


def check_every() -> int:
    """Optimizer steps between two agreements of the ranks on whether a signal came."""
    value = os.environ.get("STATE_PREEMPT_CHECK_EVERY", "").strip()
    if not value:
        return CHECK_EVERY
    if not value.isdigit() or int(value) < 1:
        raise StateError(f"STATE_PREEMPT_CHECK_EVERY={value!r} is not a positive whole number",
                         hint=f"unset it (default {CHECK_EVERY}) or set e.g. STATE_PREEMPT_CHECK_EVERY=10")
    return int(value)


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

    With gradient accumulation the boundary is the next optimizer step, not the next batch: the
    gradients of a half-accumulated step are in no checkpoint, and a resumed run would lose them.
    """

    def __init__(self, checkpoint: str | os.PathLike | None) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.signum: int | None = None  # the signal received
        self.stopped_at: int | None = None  # global step of the checkpoint written on the signal
        self._previous: dict[int, Any] = {}
        self._after_validation = False
        self._requeue_signal: int | None = None  # Lightning's SLURM requeue signal whose handler we hold back
        self._step_at_batch_start = -1
        self.every = check_every()
        self._group: Any = None  # the CPU process group the ranks agree over (None: the default group)

    # -- signals
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.signum, self.stopped_at, self._after_validation = None, None, False

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._install(trainer)  # Lightning installed its handlers just before

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._install(trainer)
        if trainer.world_size > 1:  # every rank runs this hook: creating the group is collective
            self._group = _cpu_group()

    def _install(self, trainer: Any) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        requeue_signal = _slurm_requeue_signal(trainer)
        for signum in PREEMPT_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        held_back = requeue_signal is not None and _is_lightnings(self._previous.get(requeue_signal))
        self._requeue_signal = int(requeue_signal) if held_back else None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            log.warning("received %s: writing a checkpoint at the end of this step, then stopping",
                        signal.Signals(signum).name)
        self.signum = signum
        previous = self._previous.get(signum)
        # SIGTERM is not passed on while training: Lightning would abort a running validation and skip
        # it on resume. Lightning's SLURM requeue handler is replaced by requeue_slurm_job in _stop.
        if signum != signal.SIGTERM and signum != self._requeue_signal and callable(previous):
            previous(signum, frame)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips teardown hooks when fit fails

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal and previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    # -- the step boundary
    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self._step_at_batch_start = int(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.accumulate_grad_batches > 1 and trainer.global_step == self._step_at_batch_start:
            return  # gradients of this batch are accumulated, not in any checkpoint: stop after the step
        if self.stopped_at is not None:
            return
        signalled = self.signum is not None or bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:  # every rank stops at the same step (the signal may reach one rank)
            if trainer.global_step % self.every:
                return
            signalled = _any_rank(signalled, self._group)
        if not signalled:
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
        requeue = self._requeue_signal is not None and self.signum == self._requeue_signal
        if trainer.world_size > 1:  # the signal may have reached another rank only
            requeue = _any_rank(requeue, self._group)
        if requeue and trainer.is_global_zero:
            requeue_slurm_job()

    def preempted(self) -> RunPreempted | None:
        if self.stopped_at is None or self.signum is None:
            return None
        return RunPreempted(self.signum, self.stopped_at, self.checkpoint)


def _cpu_group() -> Any:
    """A gloo group over all ranks when the default one is not (nccl); None: use the default group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def _any_rank(flag: bool, group: Any) -> bool:
    """Whether ``flag`` holds on any rank: a one-number all_reduce on the CPU (no GPU work is waited for)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _slurm_requeue_signal(trainer: Any) -> int | None:
    """The signal on which Lightning requeues this SLURM batch job (None: not SLURM, or auto-requeue off)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    connector = getattr(trainer, "_accelerator_connector", None)
    environment = getattr(connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
        return int(environment.requeue_signal)
    return None


def _is_lightnings(handler: Any) -> bool:
    return type(handler).__module__.startswith("lightning.")


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` for this job (an array job's own task), as Lightning's handler does; never raises."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("cannot requeue: SLURM_JOB_ID is not set")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not requeue SLURM job %s: %s (requeue it yourself: scontrol requeue %s)", job, exc, job)
        return False
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()[:1] or [f"exit status {done.returncode}"]
        log.warning("could not requeue SLURM job %s: %s (requeue it yourself: scontrol requeue %s)",
                    job, reason[0], job)
        return False
    log.info("requeued SLURM job %s: it resumes from the checkpoint when it starts again", job)
    return True


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
