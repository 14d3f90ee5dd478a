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


@pytest.fixture
def state_log(caplog):
    """caplog that also sees the `state` logger (the CLI stops it propagating to the root)."""
    logger = logging.getLogger("state")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


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
