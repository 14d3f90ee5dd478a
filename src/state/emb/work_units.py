"""The bookkeeping of a sharded, resumable ``state emb transform``: inputs, shards, work units, manifest.

A work unit is a fixed run of rows of one input file (``unit_rows``, a multiple of the tokenizer's
``SAMPLING_BLOCK``, whose RNG streams are per block), so a unit's embeddings do not depend on which
process computes it or how the work is split. Units are numbered file by file, row by row; shard
``I/N`` takes units ``I, I+N, I+2N, ...``.

The work folder holds ``manifest.json`` (what the units were computed with: model identity, seed,
unit size, every input's identity) and per input file ``<stem>/u<first row>.npy`` plus its entry
``u<first row>.json`` (rows, sha256). Both are written atomically, the entry last, so a unit counts
as done only when its entry exists: a rerun after ``kill -9`` recomputes exactly the unfinished units.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from state.io.atomic import atomic_path, atomic_write_text
from state.utils.errors import StateError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_GLOB_CHARS = re.compile(r"[*?\[]")


# ---------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard | None:
    """``"I/N"`` with 0 <= I < N (SLURM's ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` with ``--array=0-(N-1)``)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise StateError(f"--shard {text!r} is not of the form I/N",
                         hint="pass e.g. --shard 0/4 ... --shard 3/4, one per process (I counts from 0)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise StateError(f"--shard {text}: the shard index must be in 0..{max(count - 1, 0)} for {count} shards",
                         hint=f"pass --shard I/{max(count, 1)} with I from 0 to {max(count - 1, 0)}")
    return Shard(index, count)


def take(units: Sequence, shard: Shard | None, rank: int = 0, world: int = 1) -> list:
    """The units of ``shard`` (round robin), then of local process ``rank`` of ``world`` (round robin again)."""
    mine = list(units) if shard is None else list(units[shard.index :: shard.count])
    return mine[rank::world]


# ---------------------------------------------------------------------------------------------- inputs
def expand_inputs(specs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (their ``*.h5ad``) and globs, in the order given (each folder / glob sorted)."""
    paths: list[Path] = []
    for spec in specs:
        text = str(spec)
        path = Path(text)
        if path.is_dir():
            found = sorted(path.glob("*.h5ad"))
            if not found:
                raise StateError(f"--input folder {path} holds no *.h5ad files", hint="pass a folder of .h5ad files")
        elif _GLOB_CHARS.search(text) and not path.exists():
            found = sorted(Path(p) for p in glob.glob(text))  # noqa: PTH207 (absolute patterns too)
            if not found:
                raise StateError(f"--input pattern {text!r} matches no file", hint="check the pattern (quote it)")
        else:
            found = [path]
        paths.extend(found)
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise StateError(f"--input files {seen[path.stem]} and {path} have the same name {path.stem!r}; "
                             "outputs and work units are named after the file",
                             hint="rename one of them or embed them in separate runs")
        seen[path.stem] = path
    return paths


def input_identity(path: Path, *, n_obs: int, n_vars: int, genes: np.ndarray) -> dict[str, Any]:
    """What must not change between a unit and the merge: file size and mtime, shape, the gene mapping."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "n_obs": n_obs,
            "n_vars": n_vars, "genes_sha256": hashlib.sha256(np.ascontiguousarray(genes, np.int64)).hexdigest()}


def model_identity(model) -> str:
    """sha256 of every parameter and buffer (the gene table included) of a loaded SE model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    file: str  # input stem
    first: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.first


def units_of(stem: str, n_obs: int, unit_rows: int) -> list[Unit]:
    return [Unit(stem, first, min(first + unit_rows, n_obs)) for first in range(0, n_obs, unit_rows)]


class WorkDir:
    """The unit store and manifest of one sharded transform."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def _unit_base(self, unit: Unit) -> Path:
        return self.path / unit.file / f"u{unit.first:012d}"

    def is_done(self, unit: Unit) -> bool:
        return self._unit_base(unit).with_suffix(".json").is_file()

    def write(self, unit: Unit, embeddings: np.ndarray) -> None:
        """The unit's array, then its entry, each atomically (the entry marks it done)."""
        base = self._unit_base(unit)
        base.parent.mkdir(parents=True, exist_ok=True)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        with atomic_path(base.with_suffix(".npy")) as tmp:
            np.save(tmp, embeddings)
        entry = {"first": unit.first, "rows": unit.rows, "width": int(embeddings.shape[1]),
                 "sha256": hashlib.sha256(embeddings).hexdigest()}
        atomic_write_text(base.with_suffix(".json"), json.dumps(entry))

    def read(self, unit: Unit, width: int) -> np.ndarray:
        base = self._unit_base(unit)
        entry = json.loads(base.with_suffix(".json").read_text())
        array = np.load(base.with_suffix(".npy"))
        if array.shape != (unit.rows, width) or hashlib.sha256(np.ascontiguousarray(array)).hexdigest() != entry["sha256"]:
            raise StateError(f"work unit {base}.npy is damaged (shape {array.shape}, checksum differs from its entry)",
                             hint=f"delete {base}.npy and {base}.json and rerun the same command to recompute it")
        return array

    def drop_arrays(self, stem: str) -> None:
        """After a merge: the unit arrays go, the entries and markers stay (a rerun then has nothing to do)."""
        for pattern in ("u*.npy", ".u*"):  # ".u*": temporary files of writes cut short by a kill
            for path in (self.path / stem).glob(pattern):
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ markers (merge bookkeeping)
    def marker(self, stem: str, name: str) -> Path:
        return self.path / stem / f"{name}.json"

    def read_marker(self, stem: str, name: str) -> dict | None:
        path = self.marker(stem, name)
        return json.loads(path.read_text()) if path.is_file() else None

    def write_marker(self, stem: str, name: str, content: dict) -> None:
        self.marker(stem, name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.marker(stem, name), json.dumps(content))

    # ------------------------------------------------------------------ manifest
    def claim(self, manifest: dict[str, Any]) -> None:
        """Write the manifest, or check that the one there describes the same work.

        Concurrent shards race for the first write: the loser (os.link fails) compares instead.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / MANIFEST
        manifest = {"format": MANIFEST_FORMAT, **manifest}
        if not target.is_file():
            fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=self.path)
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(manifest, handle, indent=1, sort_keys=True)
                os.link(tmp, target)  # fails if another shard got there first: then compare
                return
            except FileExistsError:
                pass
            finally:
                Path(tmp).unlink()
        self._check_same(json.loads(target.read_text()), manifest, target)

    @staticmethod
    def _check_same(stored: dict, ours: dict, where: Path) -> None:
        fix = (f"rerun with the same checkpoint, --seed, --unit-rows and inputs as the run that made it, "
               f"or pass another --work-dir (or delete {where.parent})")
        if stored.get("format") != ours["format"]:
            raise StateError(f"{where} has manifest format {stored.get('format')}, expected {ours['format']}", hint=fix)
        for key, what in (("model_sha256", "another model (checkpoint or protein embeddings)"),
                          ("seed", "another --seed"), ("unit_rows", "another --unit-rows"),
                          ("width", "another embedding width")):
            if stored.get(key) != ours.get(key):
                raise StateError(f"{where} was made with {what}: {key} {stored.get(key)!r} there, "
                                 f"{ours.get(key)!r} now", hint=fix)
        for stem, identity in ours["inputs"].items():
            before = stored.get("inputs", {}).get(stem)
            if before is None:
                raise StateError(f"{where} does not list input {identity['path']} (it lists "
                                 f"{', '.join(sorted(stored.get('inputs', {}))) or 'none'})", hint=fix)
            changed = sorted(k for k in identity if k != "path" and before.get(k) != identity[k])
            if changed:
                raise StateError(f"input {identity['path']} changed since {where} was made ({', '.join(changed)} "
                                 f"differ)", hint=fix)
        missing = sorted(set(stored.get("inputs", {})) - set(ours["inputs"]))
        if missing:
            raise StateError(f"{where} also lists inputs {', '.join(missing)} that this command does not pass",
                             hint=fix)
