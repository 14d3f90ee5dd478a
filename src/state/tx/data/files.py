"""Which files a TOML split names: reading the TOML and expanding its dataset paths as cell-load does.

Shared by the input checks of the data module and by ``state tx index`` (the training layout).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

from state.utils.errors import StateError

_GLOB_CHARS = set("*?[]{}")


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^}]+)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out: list[str] = []
    for option in match.group(1).split(","):
        out.extend(_expand_braces(head + option.strip() + tail))
    return out


def dataset_files(path_spec: str) -> list[Path]:
    """The files cell-load would read for one ``[datasets]`` entry (file, folder or glob)."""
    if _GLOB_CHARS & set(path_spec):
        files: list[Path] = []
        for pattern in _expand_braces(path_spec):
            patterns = [pattern] if pattern.endswith((".h5", ".h5ad")) else [
                f"{pattern.rstrip('/')}/*.h5",
                f"{pattern.rstrip('/')}/*.h5ad",
            ]
            for pat in patterns:
                files.extend(Path(f) for f in sorted(glob.glob(pat)))  # noqa: PTH207 - cell-load's glob rules
        return files
    path = Path(path_spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.glob("*.h5")) + sorted(path.glob("*.h5ad"))
    return []


def read_toml(path: Path) -> Any:
    """The TOML as cell-load's ``ExperimentConfig``; a parse error or a non-table section is one line."""
    import toml
    from cell_load.config import ExperimentConfig

    try:
        raw = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise StateError(f"TOML file {path} cannot be parsed: {exc}", hint="fix the TOML syntax") from exc
    bad = [s for s in ("datasets", "training", "zeroshot", "fewshot") if not isinstance(raw.get(s, {}), dict)]
    if bad:
        raise StateError(f"TOML file {path}: section(s) {', '.join(bad)} must be tables")
    return ExperimentConfig(
        datasets=raw.get("datasets", {}),
        training=raw.get("training", {}),
        zeroshot=raw.get("zeroshot", {}),
        fewshot=raw.get("fewshot", {}),
    )
