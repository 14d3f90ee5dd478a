"""Atomic writes: write next to the target under a temporary name, then rename.

A crash (or ``kill -9``) mid-write leaves either the old file or the new one, never a truncated
file, and a failed write leaves no partial output behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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
        try:
            yield tmp
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
            cause = space_oserror(exc)
            if cause is None:
                raise
            raise out_of_space_error(target, cause, needed=_size_or_none(tmp)) from cause
        if tmp.is_file():
            # mkstemp creates the file 0600; give the result the permissions a plain open() would.
            tmp.chmod(0o666 & ~_current_umask())
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def space_oserror(exc: BaseException | None) -> OSError | None:
    """The disk-full / quota / file-size-limit OSError behind ``exc`` (itself or what it was raised from)."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes} B"


def out_of_space_error(target: str | os.PathLike, exc: OSError, *, needed: int | None,
                       at_least: bool = True) -> StateError | None:
    """The one-line error for a write that failed for lack of space (disk full, quota, file-size
    limit), naming the file, the space it needs and the space free; None for any other failure.

    ``needed`` is the file's full size when known (``at_least=False``), else what was written
    before the failure.
    """
    if exc.errno not in _SPACE_ERRNOS:
        return None
    target = Path(target)
    try:
        free = _human(shutil.disk_usage(target.parent).free)
    except OSError:
        free = "unknown"
    size = "an unknown amount" if needed is None else ("at least " if at_least else "") + _human(needed)
    if exc.errno == errno.EFBIG:
        why, hint = "the file size limit (ulimit -f) was reached", "raise the file size limit or write less"
    elif exc.errno == errno.ENOSPC:
        why, hint = "no space left on the device", "free space there or write to another folder"
    else:
        why, hint = "the disk quota is exceeded", "free space in your quota or write to another folder"
    return StateError(f"cannot write {target}: {why} (it needs {size}; {free} free there); "
                      "nothing was written and any previous file is unchanged", hint=hint)


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
