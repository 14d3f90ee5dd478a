"""Keep freed memory in the process for reuse (glibc malloc tuning for CPU tensor work).

With glibc's defaults, a freed block of a few MiB at the top of the heap is handed back to the
kernel (``M_TRIM_THRESHOLD``) and blocks above the dynamic mmap threshold get their own mapping,
so the next batch's activations of the same size are page-faulted and zeroed again. For CPU
inference and training that repeats every forward pass: measured on a State model forward
(4,096 cells per call, one thread), about 30% of the time went to those page faults.

:func:`reuse_freed_memory` raises both thresholds once (32 MiB, glibc's largest mmap threshold on
64-bit, and 4 GiB) so same-sized allocations are served from memory the process already holds.
Peak RSS is unchanged (the same bytes are live at the peak); the process keeps its heap until it
exits instead of shrinking after a peak, which is why only the ``tx train`` / ``tx infer`` command
processes call it (never the Python API inside a user's session). Set ``STATE_MALLOC_TUNING=0`` to
leave malloc alone. Nothing happens on other C libraries or platforms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 4 * 1024 * 1024 * 1024 - 1
_done = False


def reuse_freed_memory() -> bool:
    """Tune glibc malloc once per process; returns True when the tuning is in effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("STATE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    ok = ok and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    log.debug("malloc tuning %s", "on" if ok else "refused by the C library")
    _done = ok
    return ok
