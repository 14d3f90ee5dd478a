"""Atomic writes: write next to the target under a temporary name, then rename.

A crash (or ``kill -9``) mid-write leaves either the old file or the new one, never a truncated
file, and a failed write leaves no partial output behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from state.utils.errors import StateError


def ensure_parent_writable(path: str | os.PathLike) -> Path:
    """Create the parent folder of ``path`` if needed and check it is writable."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(
            f"cannot create output folder {parent}: {exc.strerror or exc}",
            hint="choose an output path in a folder you can write to",
        ) from exc
    if not os.access(parent, os.W_OK):
        raise StateError(
            f"output folder {parent} is not writable",
            hint="choose an output path in a folder you can write to",
        )
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary name keeps the real suffix (``.h5ad``, ``.npy`` ...) because several writers
    look at it. On any exception the temporary file is removed and ``path`` is untouched.
    """
    target = ensure_parent_writable(path)
    suffix = target.suffix if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            # mkstemp creates the file 0600; give the result the permissions a plain open() would.
            tmp.chmod(0o666 & ~_current_umask())
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_h5ad(adata, path: str | os.PathLike, **kwargs) -> Path:
    """Write an AnnData atomically (the temporary file keeps the ``.h5ad`` suffix)."""
    return atomic_write(path, lambda tmp: adata.write_h5ad(tmp, **kwargs))
