"""The training layout: a group-sorted, memmap-able copy of a dataset's cell rows.

cell-load reads one obsm row per cell with h5py (an 8 KB random read plus a Python dict per cell).
Training draws sets of cells from one (cell type, perturbation) group, so if the rows of each group
lie next to each other, a set is a few contiguous slices. ``state tx index`` writes, beside each
h5/h5ad file of a split TOML (``<file>.state_layout/``), or under ``--layout-dir``:

* ``<key>.f32``: the obsm matrix ``key`` as raw little-endian float32, one row per cell, rows
  sorted by (cell type, perturbation) and shuffled within each group with a seed (see
  :func:`layout_order`; ``--by-batch`` adds the batch to the key);
* ``order.npy``: layout row -> row of the source file (int64);
* ``groups.npz``: the group table: ``cell_type``, ``pert``, ``batch`` (codes of the file's obs
  categories; batch -1 unless sorted by batch) and ``start``/``stop`` (layout rows of the group's run);
* ``batch.npy``: batch code per layout row; ``barcodes.npy``: obs names per layout row;
* ``X.data.f32``/``X.indices.i32``/``X.indptr.i64`` when ``X`` is among the keys: the full gene
  matrix as CSR in layout order (see :mod:`state.tx.data.layout_csr`);
* ``meta.json``: source path, size and mtime (a changed source makes the layout stale), columns,
  matrix widths, seed, and the size of every file (a truncated copy is refused before training).

The source files are never changed and stay the source of truth: splits, categories and names are
still read from them (by cell-load). The rewrite streams, in two sequential passes over the target
(see :func:`_scatter_matrix`), so memory stays at a few hundred MB whatever the size of the file and
the disk sees large sequential writes even when the layout is larger than the page cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from state.tx.data import layout_csr
from state.tx.data.files import dataset_files, read_toml
from state.utils.errors import StateError

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
SUFFIX = ".state_layout"
CHUNK_BYTES = 128 * 2**20  # source rows read at once
BUCKET_BYTES = 256 * 2**20  # layout rows put in order at once (see _scatter_matrix)


def layout_path(source: str | os.PathLike, layout_dir: str | os.PathLike | None = None) -> Path:
    """Where the layout of ``source`` lives: beside it, or in ``layout_dir`` (named uniquely)."""
    source = Path(source).resolve()
    if layout_dir is None:
        return source.with_name(source.name + SUFFIX)
    tag = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    return Path(layout_dir).expanduser().resolve() / f"{source.stem}-{tag}{SUFFIX}"


def _source_stamp(source: Path) -> dict[str, int]:
    st = source.stat()
    return {"source_size": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns)}


def read_codes(handle: h5py.File, column: str) -> np.ndarray:
    """Integer codes of one obs column (categorical codes; plain columns coded like cell-load does)."""
    node = handle["obs"].get(column)
    if node is None:
        raise StateError(f"obs column '{column}' is missing in {handle.filename}",
                         hint="pass the column names the training config uses (--pert-col/--cell-type-key/--batch-col)")
    if isinstance(node, h5py.Group) and "codes" in node:
        return node["codes"][:].astype(np.int32)
    _, inverse = np.unique(node[:], return_inverse=True)
    return inverse.astype(np.int32)


def read_barcodes(handle: h5py.File, n_cells: int) -> np.ndarray:
    """obs index as fixed-width bytes (memmap-able); generic names where the file has none, as cell-load."""
    node = handle["obs"].get("_index")
    if isinstance(node, h5py.Dataset):
        values = node[:]
    elif isinstance(node, h5py.Group) and "codes" in node:
        values = node["categories"][:][node["codes"][:]]
    else:
        values = np.array([f"cell_{i:06d}" for i in range(n_cells)])
    if values.dtype.kind == "O":
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in values], dtype=bytes)
    if values.dtype.kind == "U":
        return np.char.encode(values, "utf-8")
    return values.astype(bytes)


def layout_order(ct: np.ndarray, batch: np.ndarray, pert: np.ndarray, seed: int,
                 by_batch: bool = False) -> tuple[np.ndarray, dict]:
    """Layout row -> source row, and the group table of the sorted rows.

    Rows are sorted by (cell type, perturbation) and shuffled within each group, so that a training set
    (cell-load's default groups are (cell type, perturbation) with controls pooled per cell type)
    is a few contiguous windows that mix the group's batches as cell-load's random draw does. With
    ``by_batch`` the key is (cell type, perturbation, batch): every (batch, cell type, perturbation)
    group of ``basal_mapping_strategy=batch`` is one run as well, nested in its (cell type,
    perturbation) run, at the price of sets that mix fewer batches under the random strategy.
    """
    noise = np.random.default_rng(seed).random(len(ct))
    order = np.lexsort((noise, batch, pert, ct) if by_batch else (noise, pert, ct)).astype(np.int64)
    keys = np.stack([ct[order], pert[order]] + ([batch[order]] if by_batch else []))
    change = np.flatnonzero(np.any(keys[:, 1:] != keys[:, :-1], axis=0)) + 1
    starts = np.r_[0, change].astype(np.int64) if len(order) else np.zeros(0, np.int64)
    stops = np.r_[starts[1:], len(order)].astype(np.int64)
    table = {"cell_type": keys[0, starts], "pert": keys[1, starts],
             "batch": keys[2, starts] if by_batch else np.full(len(starts), -1, np.int32),
             "start": starts, "stop": stops}
    return order, table


def _dense_matrix(handle: h5py.File, key: str) -> h5py.Dataset:
    node = handle.get(f"obsm/{key}")
    if not isinstance(node, h5py.Dataset) or node.ndim != 2:
        raise StateError(f"obsm['{key}'] of {handle.filename} is missing or not a dense 2-D matrix",
                         hint="the layout copies dense obsm matrices; pick them with --keys")
    return node


def _scatter_matrix(node: h5py.Dataset, target: Path, inverse: np.ndarray) -> None:
    """Copy ``node`` into ``target`` with source row i at layout row inverse[i], in two sequential passes.

    Scattering rows straight to their layout rows writes every 8 KB row to a random place of the
    target; once the target is larger than the page cache that is random disk writes (measured ~5 MB/s
    for a 32 GB layout on a 24 GB machine). Instead the target itself holds buckets (runs of
    ``BUCKET_BYTES`` of layout rows): pass 1 reads the source in order and appends each row to its
    bucket, so a chunk of source rows goes out as one contiguous write per bucket; pass 2 reads one
    bucket at a time, puts its rows in layout order in memory and writes it back in place. Memory: a
    source chunk and two buckets of rows, plus a few integers per cell.
    """
    n, width = node.shape
    row_bytes = max(1, width * 4)
    with target.open("wb") as fh:
        fh.truncate(n * row_bytes)
    per_bucket = max(1, BUCKET_BYTES // row_bytes)
    staged = np.empty(n, np.int64)  # source row -> its row of the target after pass 1
    staged[np.argsort(inverse // per_bucket, kind="stable")] = np.arange(n, dtype=np.int64)
    step = max(1, CHUNK_BYTES // row_bytes)
    with target.open("r+b") as fh:
        fd = fh.fileno()
        for first in range(0, n, step):
            block = np.asarray(node[first:first + step], dtype=np.float32)
            rows = staged[first:first + len(block)]
            by_row = np.argsort(rows, kind="stable")
            rows, block = rows[by_row], block[by_row]
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # one run per bucket the chunk touches
            for run_rows, run in zip(np.split(rows, breaks), np.split(block, breaks)):
                _pwrite_all(fd, run, int(run_rows[0]) * row_bytes)
            del block
        layout_row = np.empty(n, np.int64)
        layout_row[staged] = inverse
        del staged
        for first in range(0, n, per_bucket):
            held = np.empty((min(per_bucket, n - first), width), np.float32)
            _pread_all(fd, held, first * row_bytes)
            ordered = np.empty_like(held)
            ordered[layout_row[first:first + len(held)] - first] = held
            del held
            _pwrite_all(fd, ordered, first * row_bytes)
            del ordered


def _pwrite_all(fd: int, rows: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(rows)).cast("B")
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread_all(fd: int, rows: np.ndarray, offset: int) -> None:
    """Fill the contiguous array ``rows`` from the file at byte ``offset`` (short reads continued)."""
    view = memoryview(rows).cast("B")
    while len(view):
        done = os.preadv(fd, [view], offset)
        if done <= 0:
            raise OSError(f"short read from the layout (fd {fd}, offset {offset})")
        view, offset = view[done:], offset + done


@dataclass(frozen=True)
class LayoutOptions:
    """What a layout copies and sorts by: ``state tx index``'s flags (``preprocess_train --write-layout``'s too)."""

    keys: tuple[str, ...] = ("X_hvg",)
    pert_col: str = "gene"
    cell_type_key: str = "cell_type"
    batch_col: str = "gem_group"
    seed: int = 0
    by_batch: bool = False
    layout_dir: str | None = None

    def write(self, source: str | os.PathLike, matrices: Mapping[str, np.ndarray] | None = None) -> Path:
        return write_layout(source, keys=list(self.keys), pert_col=self.pert_col, cell_type_key=self.cell_type_key,
                            batch_col=self.batch_col, seed=self.seed, layout_dir=self.layout_dir,
                            by_batch=self.by_batch, matrices=matrices)


def _gather_matrix(matrix: np.ndarray, target: Path, order: np.ndarray) -> None:
    """Write in-memory ``matrix`` to ``target`` in layout order (row ``order[j]`` at row j), sequentially."""
    step = max(1, CHUNK_BYTES // max(1, matrix.shape[1] * 4))
    with target.open("wb") as fh:
        for first in range(0, len(order), step):
            fh.write(np.ascontiguousarray(matrix[order[first:first + step]], dtype=np.float32).tobytes())


def write_layout(source: str | os.PathLike, *, keys: list[str], pert_col: str, cell_type_key: str,
                 batch_col: str, seed: int = 0, layout_dir: str | os.PathLike | None = None,
                 by_batch: bool = False, matrices: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write (or rewrite) the layout of one h5/h5ad file; atomic: a finished folder or none.

    ``matrices`` may hold in-memory copies of obsm matrices (rows in file order, as written to
    ``source``): ``preprocess_train`` passes the HVG matrix it just wrote, so the rows are not read
    back. obs columns and names are always read from ``source``, so the result is the same files.
    """
    source = Path(source).resolve()
    target = layout_path(source, layout_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = time.perf_counter()
    try:
        with h5py.File(source, "r") as handle:
            ct, batch, pert = (read_codes(handle, c) for c in (cell_type_key, batch_col, pert_col))
            order, table = layout_order(ct, batch, pert, seed, by_batch)
            np.save(tmp / "batch.npy", batch[order])
            del ct, batch, pert
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order), dtype=np.int64)
            widths = {}
            for key in keys:
                if key == "X":  # the full gene matrix: kept sparse (layout_csr.py)
                    widths["X"], nnz = layout_csr.write_x(handle, tmp, order, inverse)
                    continue
                node = matrices[key] if matrices and key in matrices else _dense_matrix(handle, key)
                if node.shape[0] != len(order):
                    raise StateError(f"obsm['{key}'] of {source} has {node.shape[0]} rows, obs has {len(order)}")
                if isinstance(node, h5py.Dataset):
                    _scatter_matrix(node, tmp / f"{key}.f32", inverse)
                else:
                    _gather_matrix(node, tmp / f"{key}.f32", order)
                widths[key] = int(node.shape[1])
            np.save(tmp / "barcodes.npy", read_barcodes(handle, len(order))[order])
        np.save(tmp / "order.npy", order)
        np.savez(tmp / "groups.npz", **table)
        meta = {"version": LAYOUT_VERSION, "source": str(source), **_source_stamp(source), "n_cells": len(order),
                "matrices": widths, "columns": {"pert_col": pert_col, "cell_type_key": cell_type_key,
                                                "batch_col": batch_col}, "seed": int(seed),
                "group_by": ["cell_type", "pert", "batch"] if by_batch else ["cell_type", "pert"]}
        if "X" in widths:
            meta["sparse"] = {"X": {"nnz": nnz}}
        meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}  # truncation check
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d cells, %d groups, %.1f s)", target, len(order), len(table["start"]),
             time.perf_counter() - started)
    return target


def _swap_in(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.replace(old)
        tmp.replace(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(target)


def _pread_rows(fd: int, rows: np.ndarray, out: np.ndarray, base: int, positions: np.ndarray | None = None) -> None:
    """out[positions[i]] = fixed-size record rows[i] of the file (records start at ``base``).

    One positioned read per run that is consecutive both in the file and in ``out``.
    """
    if len(rows) == 0:
        return
    pos = np.arange(len(rows)) if positions is None else np.asarray(positions, dtype=np.int64)
    record = out.strides[0]
    breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(pos) != 1)) + 1
    for first, stop in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist()):
        at = int(pos[first])
        _pread_all(fd, out[at:at + stop - first], base + int(rows[first]) * record)


@dataclass
class Layout:
    """An opened layout (matrices are mapped lazily, per process)."""

    path: Path
    meta: dict
    order: np.ndarray
    groups: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        self._maps: dict = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}
        state["order"] = None  # mapped again where it is read (8 bytes a cell, not pickled per worker)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.order is None:
            self.order = np.load(self.path / "order.npy", mmap_mode="r")

    @property
    def n_cells(self) -> int:
        return int(self.meta["n_cells"])

    def position_of(self) -> np.ndarray:
        """Source row -> layout row."""
        inverse = np.empty_like(self.order)
        inverse[self.order] = np.arange(len(self.order), dtype=np.int64)
        return inverse

    def read_rows(self, key: str, rows: np.ndarray, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        """out[positions[i]] = matrix(key)[rows[i]], one positioned read per run of consecutive rows.

        Reads go straight into ``out`` (no memory map), so a worker's resident memory stays the size
        of its batches however much of the layout it has read.
        """
        _pread_rows(self._fd(f"{key}.f32"), rows, out, 0, positions)

    def barcode_dtype(self) -> np.dtype:
        if "barcodes" not in self._maps:
            header = np.load(self.path / "barcodes.npy", mmap_mode="r")
            self._maps["barcodes"] = (header.dtype, int(header.offset))
            del header
        return self._maps["barcodes"][0]

    def read_barcodes(self, rows: np.ndarray, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        """Like :meth:`read_rows` for the obs names (``out``: a bytes array of :meth:`barcode_dtype`)."""
        dtype, offset = self.barcode_dtype(), self._maps["barcodes"][1]
        records = out.view(np.uint8).reshape(len(out), dtype.itemsize)
        _pread_rows(self._fd("barcodes.npy"), rows, records, offset, positions)

    def batch_codes(self) -> np.ndarray:
        """Batch code of every layout row (4 bytes a cell, memory-mapped)."""
        if "batch" not in self._maps:  # mapped: the processes of a node share the page cache
            self._maps["batch"] = np.load(self.path / "batch.npy", mmap_mode="r")
        return self._maps["batch"]

    def _fd(self, name: str) -> int:
        cached = self._maps.get(("fd", name))
        if cached is None or cached[0] != os.getpid():  # a forked worker opens its own descriptor
            cached = (os.getpid(), os.open(self.path / name, os.O_RDONLY))
            self._maps[("fd", name)] = cached
        return cached[1]

    def csr(self, key: str) -> layout_csr.CsrReader:
        """Reader of a sparse matrix (``X``) of the layout."""
        if ("csr", key) not in self._maps:
            self._maps[("csr", key)] = layout_csr.CsrReader(self.path)
        return self._maps[("csr", key)]

    def is_sparse(self, key: str) -> bool:
        return key in self.meta.get("sparse", {})

    def matrix(self, key: str) -> np.ndarray:
        if key not in self._maps:
            width = int(self.meta["matrices"][key])
            self._maps[key] = np.memmap(self.path / f"{key}.f32", dtype=np.float32, mode="r",
                                        shape=(self.n_cells, width))
        return self._maps[key]


def layout_problem(source: str | os.PathLike, layout_dir: str | os.PathLike | None, *, keys: list[str],
                   columns: dict[str, str]) -> str | None:
    """Why the layout of ``source`` cannot serve this training (None: it can)."""
    path = layout_path(source, layout_dir)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return f"no layout for {source}"
    meta = json.loads(meta_file.read_text())
    if meta.get("version") != LAYOUT_VERSION:
        return f"layout {path} has version {meta.get('version')}, this program writes {LAYOUT_VERSION}"
    if {k: meta.get(k) for k in ("source_size", "source_mtime_ns")} != _source_stamp(Path(source).resolve()):
        return f"layout {path} is stale ({source} changed since it was written)"
    missing = [k for k in keys if k not in meta.get("matrices", {})]
    if missing:
        what = ", ".join("the gene matrix X" if k == "X" else f"obsm key {k}" for k in missing)
        return f"layout {path} lacks {what}"
    if meta.get("columns") != columns:
        return f"layout {path} was sorted by columns {meta.get('columns')}, training uses {columns}"
    return None


def matrix_keys(kw: Mapping[str, object]) -> tuple[str, str | None, str | None]:
    """(input matrix, pert_cell_counts matrix, ctrl_cell_counts matrix) cell-load reads for these settings
    ("X" is the gene matrix; None: no such batch entry)."""
    embed_key, space = str(kw.get("embed_key") or "") or None, kw.get("output_space", "gene")
    counts = {"gene": "X_hvg", "all": "X"}.get(str(space))
    # cell-load's store_raw_expression: an embedding input whose target is another matrix
    pert_counts = counts if embed_key and ((embed_key != "X_hvg" and space == "gene") or space == "all") else None
    ctrl_counts = counts if kw.get("store_raw_basal") else None
    return embed_key or "X", pert_counts, ctrl_counts


def truncated_file(source: str | os.PathLike, layout_dir: str | os.PathLike | None) -> str | None:
    """The first file of the layout of ``source`` whose size differs from what its meta says (None: all
    complete, or no layout). A copy cut short (full disk, interrupted rsync) would fail mid-run."""
    path = layout_path(source, layout_dir)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None if not (path / "meta.json").exists() else str(path / "meta.json")
    expected = dict(meta.get("files") or {})
    if not expected:  # layouts written before sizes were recorded: the raw matrices' sizes follow from meta
        expected = {f"{k}.f32": int(meta["n_cells"]) * int(w) * 4 for k, w in meta.get("matrices", {}).items()}
    for name, size in sorted(expected.items()):
        file = path / name
        if not file.is_file() or file.stat().st_size != int(size):
            return str(file)
    return None


def open_layout(source: str | os.PathLike, layout_dir: str | os.PathLike | None = None) -> Layout:
    path = layout_path(source, layout_dir)
    meta = json.loads((path / "meta.json").read_text())
    with np.load(path / "groups.npz") as table:
        groups = {k: table[k] for k in table.files}
    return Layout(path=path, meta=meta, order=np.load(path / "order.npy", mmap_mode="r"), groups=groups)


def toml_sources(toml_path: str | os.PathLike) -> list[Path]:
    """The h5/h5ad files of every dataset a split TOML uses (cell-load's file rules)."""

    toml_path = Path(toml_path)
    if not toml_path.is_file():
        raise StateError(f"TOML file not found: {toml_path}", hint="check the --toml path")
    config = read_toml(toml_path)
    files: list[Path] = []
    for name in sorted(config.get_all_datasets()):
        spec = config.datasets.get(name)
        found = dataset_files(str(spec)) if spec is not None else []
        if not found:
            raise StateError(f"[datasets] {name} = '{spec}' matches no .h5/.h5ad file",
                             hint="fix the TOML path (relative paths are read from the current folder)")
        files.extend(found)
    return list(dict.fromkeys(files))


def index_toml(toml_path: str | os.PathLike, *, keys: list[str], pert_col: str, cell_type_key: str,
               batch_col: str, seed: int = 0, layout_dir: str | os.PathLike | None = None,
               by_batch: bool = False) -> list[Path]:
    """``state tx index``: write the layout of every file the TOML names; returns the layout folders."""
    return [write_layout(f, keys=keys, pert_col=pert_col, cell_type_key=cell_type_key, batch_col=batch_col,
                         seed=seed, layout_dir=layout_dir, by_batch=by_batch) for f in toml_sources(toml_path)]
