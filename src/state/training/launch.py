"""One decision per launch: rank 0 decides what to do with the run directory and tells the other ranks.

srun and torchrun start every rank at once, before any process group exists, and each rank runs the
command from the top. If each rank looked at the run directory itself, some could resume while rank 0
deletes the folder under ``overwrite=true``, or wait out the rendezvous timeout while rank 0 has refused
a folder another job holds. So only global rank 0 looks; it writes its decision (resume from which
checkpoint, or the refusal with its reason) to a small file, and the other ranks wait for that file.
A file works before the process group exists and across nodes that share the output folder (which
they must anyway: rank 0 writes the checkpoints every rank resumes from).

The file is ``<output_dir>/.state-launch/<key>.json``; the key hashes the run's name and the launch's
identity, which every rank of one launch shares and the next launch does not:

- ``STATE_LAUNCH_ID`` when set (rank 0 sets a fresh one when the launcher gives none; every process
  exports the identity it found there, so that the ranks Lightning starts on a node inherit it);
- else the launcher's variables: SLURM's job, step and restart count, torchrun's run id and restart
  count, ``MASTER_ADDR`` / ``MASTER_PORT``.

A process that has the decision also puts it in its environment (``STATE_LAUNCH_DECISION``): the
ranks Lightning starts on a node (copies of their parent's environment, started after the parent
decided or read) take it from there instead of the file.

Rank 0 removes its decision when its run ends (a refusal stays, for ranks that read it late) and
before deciding. A decision left by an earlier launch with the same identity (the same command
relaunched with the same port after a crash) is ignored when it is older than the waiting process
(minus ``STATE_LAUNCH_SKEW_S``, default 60 s, for clocks and start times that differ between
nodes). The other ranks wait ``STATE_LAUNCH_WAIT_S`` seconds (default 600) before giving up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from state.io.atomic import atomic_write_text
from state.utils.errors import StateError

log = logging.getLogger(__name__)

DECISION_DIR = ".state-launch"
INHERITED = "STATE_LAUNCH_DECISION"
LAUNCH_VARS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID",
               "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT")


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        return float(value) if value else default
    except ValueError:
        raise StateError(f"{name}={value!r} is not a number of seconds", hint=f"unset it or set e.g. {name}={default:g}") from None


def launch_id(*, create: bool) -> str | None:
    """The launch's identity; None when the environment names none.

    ``create``: rank 0 generates one when there is none (exported as ``STATE_LAUNCH_ID`` for the
    ranks it starts itself).
    """
    explicit = os.environ.get("STATE_LAUNCH_ID", "").strip()
    if explicit:
        return explicit
    parts = [f"{var}={os.environ[var]}" for var in LAUNCH_VARS if os.environ.get(var)]
    if parts:
        return ";".join(parts)
    if not create:
        return None
    os.environ["STATE_LAUNCH_ID"] = generated = uuid.uuid4().hex
    return generated


def _process_started() -> float:
    """When this process started (epoch seconds); 0 when the system does not say."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


class LaunchDecision:
    """The decision file of one run (``output_dir/name``) in one launch."""

    def __init__(self, output_dir: str | os.PathLike, name: str, identity: str) -> None:
        self.key = hashlib.sha256(f"{name}\0{identity}".encode()).hexdigest()[:20]
        self.path = Path(output_dir).expanduser() / DECISION_DIR / f"{self.key}.json"
        self.name = name

    # rank 0
    def publish(self, decision: dict[str, Any]) -> None:
        decision = {**decision, "written": time.time(), "run": self.name}
        atomic_write_text(self.path, json.dumps(decision))
        self._hand_down(decision)

    def _hand_down(self, decision: dict[str, Any]) -> None:
        os.environ[INHERITED] = json.dumps({**decision, "key": self.key})

    def refuse(self, exc: StateError) -> None:
        self.publish({"refused": exc.message, "hint": exc.hint})

    def retract(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()  # only when no other run's decision is there

    def clear_stale(self) -> None:
        """Remove a decision an earlier launch with this identity left (rank 0, before deciding)."""
        with contextlib.suppress(OSError):
            self.path.unlink()

    # the other ranks
    def receive(self, *, rank: int) -> dict[str, Any]:
        """Rank 0's decision: inherited from the process that started this one, else from the file."""
        try:
            inherited = json.loads(os.environ.get(INHERITED, "") or "null")
        except ValueError:
            inherited = None
        if isinstance(inherited, dict) and inherited.get("key") == self.key:
            return inherited
        decision = self.wait(rank=rank)
        self._hand_down(decision)
        return decision

    def wait(self, *, rank: int, fresh_since: float | None = None) -> dict[str, Any]:
        """Rank 0's decision from the file; raises StateError when rank 0 refused, or said nothing in time."""
        timeout = _seconds("STATE_LAUNCH_WAIT_S", 600.0)
        since = fresh_since if fresh_since is not None else _process_started() - _seconds("STATE_LAUNCH_SKEW_S", 60.0)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            decision = self._read()
            if decision is not None and float(decision.get("written", 0)) >= since:
                break
            if time.monotonic() > deadline:
                raise StateError(
                    f"rank {rank}: rank 0 did not decide within {timeout:g} s whether to start, resume or refuse "
                    f"{self.name} (no {self.path})",
                    hint="see rank 0's error; if rank 0 starts much later than the others, raise STATE_LAUNCH_WAIT_S; "
                    "every rank must see the same output_dir (a shared file system)",
                )
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)
        if "refused" in decision:
            raise StateError(f"rank 0 refused to start: {decision['refused']}", hint=decision.get("hint"))
        return decision

    def _read(self) -> dict[str, Any] | None:
        try:
            decision = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return decision if isinstance(decision, dict) else None


def decision_for(output_dir: str | os.PathLike, name: str, *, rank: int, processes: int) -> LaunchDecision | None:
    """The launch's decision file for the run ``output_dir/name``; None in a single process.

    ``processes`` is what the config asks for (devices x nodes); the launcher's ``WORLD_SIZE`` /
    ``SLURM_NTASKS`` count too.
    """
    launched = [int(os.environ[v]) for v in ("WORLD_SIZE", "SLURM_NTASKS") if os.environ.get(v, "").isdigit()]
    if max([processes, *launched]) <= 1 and rank == 0:
        return None
    identity = launch_id(create=rank == 0)
    if identity is not None:
        # The ranks Lightning starts from this process inherit the identity as it is now; the variables it
        # was derived from may change before then (Lightning sets MASTER_ADDR / MASTER_PORT when it launches).
        os.environ["STATE_LAUNCH_ID"] = identity
    if identity is None:
        raise StateError(
            f"rank {rank} cannot tell which launch it belongs to (no STATE_LAUNCH_ID, SLURM_JOB_ID, "
            "TORCHELASTIC_RUN_ID or MASTER_ADDR/MASTER_PORT in its environment)",
            hint="start every rank with the same STATE_LAUNCH_ID=<any text>, or through srun/torchrun",
        )
    return LaunchDecision(output_dir, name, identity)
