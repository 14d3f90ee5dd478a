"""Refuse to resume a run whose ``last.ckpt`` does not fit the model the config now builds.

Lightning would otherwise fail deep inside ``load_state_dict`` with a many-line size-mismatch
traceback, after the run directory was already rewritten. Checked before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from state.utils.errors import StateError


def _differences(saved: dict[str, Any], own: dict[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(saved.keys() | own.keys()):
        if key not in own:
            diffs.append(f"{key} (only in last.ckpt)")
        elif key not in saved:
            diffs.append(f"{key} (not in last.ckpt)")
        elif tuple(saved[key].shape) != tuple(own[key].shape):
            diffs.append(f"{key} {list(saved[key].shape)} vs {list(own[key].shape)}")
    return diffs


def check_resume_fits(model: Any, resume_from: Path | None, run_dir: Path) -> None:
    """One-line error when ``resume_from``'s weights do not match ``model``'s names and shapes."""
    if resume_from is None:
        return
    from state.io.safe_load import safe_torch_load

    ckpt = safe_torch_load(resume_from, what="checkpoint")
    saved = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        raise StateError(f"{resume_from} holds no state_dict, so run {run_dir} cannot be resumed",
                         hint="pick another name=..., or pass overwrite=true to start this run afresh")
    diffs = _differences(saved, model.state_dict())
    if diffs:
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise StateError(
            f"run {run_dir} already has a last.ckpt of another model shape, so it cannot be resumed: "
            f"{'; '.join(diffs[:4])}{more}",
            hint="pick another name=... for the new model, or pass overwrite=true to replace this run",
        )
