"""Checkpoint files written atomically and read without running code from them."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from state.io.atomic import atomic_path, out_of_space_error
from state.io.safe_load import safe_torch_load
from state.utils.errors import StateError

log = logging.getLogger(__name__)

# Temporary files of an unfinished save: ".<target name>.<random>.tmp" next to the target.
CHECKPOINT_TEMP_PATTERN = ".*.ckpt.*.tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, fsync it, then rename it over the target.

    A crash or ``kill -9`` in the middle of a save leaves the previous ``last.ckpt`` intact (plus at
    most a stray ``.last.ckpt.*.tmp`` file, removed by :func:`remove_stale_temp_files`). Loading
    goes through the restricted unpickler, so resuming never runs code from a checkpoint;
    ``what`` names the file in its error messages.
    """

    def __init__(self, *, what: str = "checkpoint") -> None:
        super().__init__()
        self.what = what

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        # atomic_path owns the temporary name, its removal on failure and the final file permissions.
        try:
            with atomic_path(path, suffix="") as tmp, tmp.open("wb") as fh:
                self.write_checkpoint(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except StateError as exc:
            if not isinstance(exc.__cause__, OSError):
                raise
            # Disk full / quota / file-size limit: say how big the whole checkpoint is.
            full = out_of_space_error(path, exc.__cause__, needed=_serialised_size(checkpoint), at_least=False)
            raise (full or exc) from exc.__cause__

    def write_checkpoint(self, checkpoint: dict[str, Any], fh: Any) -> None:
        """Serialise ``checkpoint`` into the open file ``fh`` (a seam for crash tests)."""
        torch.save(checkpoint, fh)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return safe_torch_load(path, what=self.what, map_location=map_location or "cpu")


class _ByteCounter:
    """A write-only file that only counts what is written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        n_bytes = memoryview(data).nbytes
        self.size += n_bytes
        return n_bytes

    def flush(self) -> None:
        pass


def _serialised_size(checkpoint: dict[str, Any]) -> int | None:
    counter = _ByteCounter()
    try:
        torch.save(checkpoint, counter)
    except Exception:  # only for the error message: never hide the real failure
        return None
    return counter.size


def remove_stale_temp_files(folder: Path, pattern: str = CHECKPOINT_TEMP_PATTERN) -> None:
    """Delete the temporary files (``pattern``) a killed save left behind in ``folder``."""
    for stray in Path(folder).glob(pattern):
        with contextlib.suppress(OSError):
            stray.unlink()
            log.info("removed unfinished checkpoint write %s", stray.name)
