"""The training layer both `tx train` and `emb fit` build on (state.training): checkpoint files,
loggers, precision / strategy policy and Trainer assembly. No training here."""

from __future__ import annotations

import os
import stat

import torch

from state.training.checkpoint_io import AtomicCheckpointIO


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_checkpoint_files_get_the_permissions_of_a_plain_write(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    plain = tmp_path / "plain.ckpt"
    torch.save({"global_step": 1}, plain)
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~_umask()
