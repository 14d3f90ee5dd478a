"""DataLoader workers leave SIGTERM / SIGUSR1 / SIGINT to the training process.

A scheduler signals a whole process group: SLURM sends SIGTERM (or ``--signal`` SIGUSR1) to every
process of the job step, a terminal sends Ctrl-C's SIGINT to the foreground group, and ``torchrun``
forwards signals to its children, loader workers included. PyTorch's worker re-raises SIGTERM from
anyone but its parent, SIGUSR1's default action ends a process, and a dead worker makes the training
process fail ("DataLoader worker ... killed by signal") before it can write its step-boundary
checkpoint. So workers ignore these signals and the training process decides (see
:mod:`state.training.preemption`); it ends its workers through their queues as usual, and a worker
whose parent is gone exits on its own (PyTorch's watchdog).

:class:`LeaveSignalsToParent` wraps a loader's ``worker_init_fn`` and keeps what it did. It also
keeps Lightning's worker seeding: Lightning adds ``pl_worker_init_function`` only to loaders
without a ``worker_init_fn`` (``seed_everything(workers=True)``), so the wrapper calls it in that case.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class LeaveSignalsToParent:
    """A picklable ``worker_init_fn``: ignore the scheduler's signals, then run ``inner`` (if any)."""

    def __init__(self, inner: Callable[[int], Any] | None = None, *, rank: int | None = None) -> None:
        self.inner = inner
        self.rank = rank  # the training process's global rank, for Lightning's worker seeds

    def __call__(self, worker_id: int) -> None:
        for signum in WORKER_IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)
        elif int(os.environ.get("PL_SEED_WORKERS", "0") or 0):
            from lightning.fabric.utilities.seed import pl_worker_init_function

            pl_worker_init_function(worker_id, rank=self.rank)


def leave_signals_to_parent(loader: Any) -> Any:
    """Give ``loader`` (a DataLoader) workers that ignore the scheduler's signals; returns ``loader``."""
    current = getattr(loader, "worker_init_fn", None)
    if getattr(loader, "num_workers", 0) > 0 and not isinstance(current, LeaveSignalsToParent):
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        loader.worker_init_fn = LeaveSignalsToParent(current, rank=getattr(rank_zero_only, "rank", None))
    return loader
