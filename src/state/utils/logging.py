"""One logging path for the whole package.

Modules call ``logging.getLogger(__name__)``; :func:`setup_logging` (called once by the CLI)
attaches a single handler to the ``state`` logger. Only rank zero logs at INFO in distributed runs.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "[%(levelname)s] %(message)s"


def global_rank() -> int:
    """The process rank in a distributed job (0 when not distributed)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    return 0


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

