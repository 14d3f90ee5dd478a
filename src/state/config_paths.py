"""Where the packaged Hydra config tree lives.

In a wheel the tree is shipped as ``state/configs``; in a source checkout (editable install) it
is the repository's top-level ``configs/`` folder.
"""

from __future__ import annotations

from pathlib import Path

from state.utils.errors import StateError


def configs_dir() -> Path:
    packaged = Path(__file__).resolve().parent / "configs"
    if (packaged / "config.yaml").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if (checkout / "config.yaml").is_file():
        return checkout
    raise StateError(
        "the packaged config tree (configs/config.yaml) was not found",
        hint="reinstall state: pip install --force-reinstall state",
    )
