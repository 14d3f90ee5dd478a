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
    handler, no propagation); while it propagates, caplog's root handler sees them already, so never twice."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger("state").propagate:
            self.target.handle(record)


@pytest.fixture(autouse=True)
def _caplog_sees_state(caplog):
    logger = logging.getLogger("state")
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
