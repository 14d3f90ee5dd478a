"""Test setup shared by every test: offline, quiet, single-threaded defaults, and ``tests/`` importable
so tests can write ``from helpers.synthetic import make_perturbation_adata``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

# Set before any test module imports torch / wandb / huggingface; explicit values from the caller win.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


class _ToCaplogWhileDetached(logging.Handler):
    """Hands `state` records to caplog once the CLI has detached that logger from the root (its own stderr
    handler, no propagation); while it propagates, or when pytest attached caplog to it, caplog sees them
    already, so never twice."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        # pytest >= 9.1 attaches caplog to loggers that were non-propagating when the test phase began itself
        logger = logging.getLogger("state")
        if not logger.propagate and self.target not in logger.handlers:
            self.target.handle(record)


@pytest.fixture(autouse=True)
def _caplog_sees_state(caplog):
    logger = logging.getLogger("state")
    for stale in [h for h in logger.handlers if isinstance(h, _ToCaplogWhileDetached)]:
        logger.removeHandler(stale)  # one forwarder, whatever an earlier test left
    forward = _ToCaplogWhileDetached(caplog.handler)
    logger.addHandler(forward)
    yield
    logger.removeHandler(forward)


@pytest.fixture
def state_log(caplog):
    """caplog; kept as a name for tests that read the `state` logger's records (every test's caplog does now)."""
    return caplog


@pytest.fixture
def fresh_logger():
    """Let the CLI attach its log handler to the stderr pytest is capturing now."""

    def drop():
        logger = logging.getLogger("state")
        for handler in [h for h in logger.handlers if getattr(h, "_state_handler", False)]:
            logger.removeHandler(handler)

    drop()
    yield
    drop()
