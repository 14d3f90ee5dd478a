"""One training job per run directory: a lock file naming its owner, stale locks taken over safely.

The lock is ``<run dir>/.state-run.lock``, a small JSON file ``{"host", "pid", "started",
"heartbeat"}`` created atomically (written under a temporary name, then hard-linked onto the lock
name, which fails if a lock is already there), so a reader never sees half a lock.

A lock is *stale* (its job is gone) when
- it names this host and a process id that no longer runs, or
- its heartbeat is older than ``STATE_LOCK_STALE_S`` seconds (default 1800): the owner refreshes it
  at most once a minute while it trains, so a job on another host that was killed stops refreshing.
  Validation or a checkpoint save longer than that window on another host could be mistaken for a
  dead job; raise the setting on such clusters;
- or it was written by an earlier run of this same SLURM job: same ``SLURM_JOB_ID``, another
  ``SLURM_RESTART_COUNT``. SLURM starts a requeued job (``scontrol requeue``, ``--requeue`` after a
  node failure or preemption) only once the previous run has ended, maybe on another host, so its
  lock is taken over at once instead of after the heartbeat window. Two job steps of one allocation
  (same job id, same restart count) still exclude each other.

A stale lock is taken over by renaming it aside (one rename wins when two jobs race) and creating a
fresh one. DDP: only global rank 0 takes the lock; the other ranks share rank 0's job.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from state.utils.errors import StateError

log = logging.getLogger(__name__)

LOCK_FILE = ".state-run.lock"
HEARTBEAT_EVERY_S = 60.0


def stale_after_s() -> float:
    return float(os.environ.get("STATE_LOCK_STALE_S", "1800"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs under another user: alive
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or not ours: treated as stale below (no owner to name)
    return owner if isinstance(owner, dict) else {}


def describe(owner: dict[str, Any]) -> str:
    slurm = owner.get("slurm_job")
    job = f"SLURM job {slurm[0]}, " if isinstance(slurm, list) and slurm else ""
    return (f"{job}host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, "
            f"started {owner.get('started', '?')}")


def _slurm_run() -> tuple[str, str] | None:
    """(job id, restart count) of the SLURM job this process belongs to; None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    return (job, os.environ.get("SLURM_RESTART_COUNT", "0")) if job else None


def is_stale(owner: dict[str, Any], *, now: float | None = None) -> bool:
    """Whether the job named by ``owner`` (a lock's contents) is gone (see the module docstring)."""
    if not owner.get("host") or not isinstance(owner.get("pid"), int):
        return True
    ours, theirs = _slurm_run(), owner.get("slurm_job")
    if ours is not None and isinstance(theirs, list) and len(theirs) == 2 and theirs[0] == ours[0]:
        if str(theirs[1]) != ours[1] and not _is_us(owner):
            return True  # an earlier run of this requeued job: SLURM ended it before starting this one
    if owner["host"] == socket.gethostname():
        return not _pid_alive(owner["pid"])
    beat = owner.get("heartbeat", 0)
    return ((time.time() if now is None else now) - float(beat)) > stale_after_s()


def _is_us(owner: dict[str, Any]) -> bool:
    return owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid()


class RunDirLock:
    """The lock of one run directory, held by this process between :meth:`acquire` and :meth:`release`."""

    def __init__(self, run_dir: str | os.PathLike, *, what: str = "run directory") -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.what = what
        self.held = False
        self._started = ""
        self._last_beat = 0.0

    def check_free(self) -> None:
        """Refuse (StateError) when another live job holds the lock; touches nothing."""
        owner = _read(self.path)
        if owner is not None and not _is_us(owner) and not is_stale(owner):
            self._refuse(owner)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        for _ in range(3):  # a lost race against another job taking over the same stale lock retries
            if self._try_create():
                self.held = True
                self._last_beat = time.time()
                return
            owner = _read(self.path)
            if owner is None:
                continue
            if _is_us(owner):  # this process already holds it (a second fit in one process)
                self.held = True
                return
            if not is_stale(owner):
                self._refuse(owner)
            self._set_aside(owner)
        raise StateError(f"could not take the lock {self.path}: other jobs keep taking it",
                         hint="check which jobs write to this run directory")

    def heartbeat(self, *, force: bool = False) -> None:
        """Refresh the heartbeat (at most once a minute unless ``force``)."""
        if not self.held or (not force and time.time() - self._last_beat < HEARTBEAT_EVERY_S):
            return
        self._last_beat = time.time()
        with contextlib.suppress(OSError):
            tmp = self._write_temp()
            tmp.replace(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = _read(self.path)
        if owner and _is_us(owner):
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _contents(self) -> dict[str, Any]:
        contents = {"host": socket.gethostname(), "pid": os.getpid(), "started": self._started,
                    "heartbeat": time.time()}
        slurm = _slurm_run()
        if slurm is not None:
            contents["slurm_job"] = list(slurm)
        return contents

    def _write_temp(self) -> Path:
        tmp = self.path.with_name(f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._contents()))
        return tmp

    def _try_create(self) -> bool:
        tmp = self._write_temp()
        try:
            os.link(tmp, self.path)  # fails when a lock exists: creation and full contents in one step
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _set_aside(self, stale: dict[str, Any]) -> None:
        """Move the stale lock away; if what was moved is no longer that lock (another job took over
        in between), put it back so that its owner keeps it."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{socket.gethostname()}.{os.getpid()}")
        try:
            self.path.rename(aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if moved != stale:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        else:
            log.warning("taking over the stale lock of %s (%s): that job is gone", self.path.parent, describe(stale))
        with contextlib.suppress(OSError):
            aside.unlink()

    def _refuse(self, owner: dict[str, Any]) -> None:
        raise StateError(
            f"{self.what} {self.path.parent} is in use by another job ({describe(owner)})",
            hint=f"wait for it to finish, or if that job is gone delete {self.path}",
        )


class RunDirLockCallback(Callback):
    """Holds the run directory's lock on global rank 0 from ``setup`` to ``teardown``."""

    def __init__(self, run_dir: str | os.PathLike, *, what: str = "run directory") -> None:
        self.lock = RunDirLock(run_dir, what=what)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.global_rank == 0:
            self.lock.acquire()

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.lock.heartbeat()

    def on_validation_batch_end(self, trainer: Any, *args: Any) -> None:
        self.lock.heartbeat()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.lock.release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.lock.release()  # Lightning skips teardown hooks when fit fails
