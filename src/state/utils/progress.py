"""The one progress-bar helper.

Bars go to stderr, disappear when stderr is not a terminal unless forced, and are silent on
non-zero ranks, so batch jobs' logs are not flooded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from state.utils.logging import global_rank

T = TypeVar("T")


def progress_enabled(disable: bool | None = None) -> bool:
    if disable is not None:
        return not disable
    if global_rank() != 0:
        return False
    if os.environ.get("STATE_PROGRESS", "").lower() in {"0", "false", "off"}:
        return False
    if os.environ.get("STATE_PROGRESS", "").lower() in {"1", "true", "on"}:
        return True
    return sys.stderr.isatty()


def progress(
    iterable: Iterable[T] | None = None,
    *,
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    disable: bool | None = None,
    **kwargs,
) -> Iterator[T] | tqdm:
    """Wrap ``iterable`` in a progress bar (or return a manual bar when ``iterable`` is None)."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=not progress_enabled(disable),
        dynamic_ncols=True,
        file=sys.stderr,
        **kwargs,
    )
