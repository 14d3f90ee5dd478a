"""One logging path for the whole package.

Modules call ``logging.getLogger(__name__)``; :func:`setup_logging` (called once by the CLI)
attaches a single handler to the ``state`` logger. Only rank zero logs at INFO in distributed runs.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "[%(levelname)s] %(message)s"


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def global_rank() -> int:
    """This process's rank in a distributed job (0 when not distributed), before any process group exists.

    A launcher that knows it says so: ``RANK`` (torchrun, Lightning's multi-node children),
    ``SLURM_PROCID`` (one srun task per process), ``JSM_NAMESPACE_RANK`` (LSF). Otherwise (Lightning
    starts the processes of a node, ``NODE_RANK`` / ``GROUP_RANK`` / ``SLURM_NODEID`` name the node) it
    is node x processes per node + ``LOCAL_RANK``, with the processes per node from
    ``LOCAL_WORLD_SIZE`` / ``SLURM_NTASKS_PER_NODE`` when given. That is exact whenever it matters
    here: only the first process of the first node is 0.
    """
    exact = _env_int("RANK", "JSM_NAMESPACE_RANK")
    if exact is not None:
        return exact
    local = _env_int("LOCAL_RANK")
    if local is None:  # SLURM started this process itself (srun), unless a launcher below it set LOCAL_RANK
        procid = _env_int("SLURM_PROCID")
        if procid is not None:
            return procid
    local = local if local is not None else (_env_int("SLURM_LOCALID") or 0)
    node = _env_int("NODE_RANK", "GROUP_RANK", "SLURM_NODEID") or 0
    per_node = _env_int("LOCAL_WORLD_SIZE") or _env_int_prefix("SLURM_NTASKS_PER_NODE") or local + 1
    return node * max(per_node, local + 1) + local


def _env_int_prefix(name: str) -> int | None:
    """The leading number of a variable such as SLURM_NTASKS_PER_NODE=``8(x2)``."""
    digits = ""
    for char in os.environ.get(name, "").strip():
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else None


class _StderrHandler(logging.StreamHandler):
    """A stderr handler that survives its stream being closed.

    The handler is created once per process; when a caller that swapped ``sys.stderr`` (pytest's
    capture, a notebook) closes that stream, later records go to the current ``sys.stderr``
    instead of raising "Logging error" tracebacks.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self.stream, "closed", False):
            self.stream = sys.stderr  # setStream would flush the closed one
        super().emit(record)


def setup_logging(verbosity: int = 0) -> None:
    """Configure the ``state`` logger: 0 = INFO, 1+ = DEBUG, negative = WARNING only.

    Non-zero ranks only report warnings and errors so multi-GPU logs are not repeated N times.
    """
    level = logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    if global_rank() != 0:
        level = max(level, logging.WARNING)
    logger = logging.getLogger("state")
    logger.setLevel(level)
    if not any(getattr(h, "_state_handler", False) for h in logger.handlers):
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._state_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    # Third-party chatter that hides our own messages.
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric", "h5py", "numba"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))

