"""The layout of ``X``: the full gene matrix, group-sorted like the obsm keys, kept sparse.

``X`` has ~18,000 genes of which a cell expresses a few thousand, so its rows are copied as CSR
(also when the h5ad stores ``X`` dense): ``X.data.f32`` (values as float32, cell-load's dtype),
``X.indices.i32`` (gene of each value) and ``X.indptr.i64`` (layout row -> first value, n+1 int64),
all raw little-endian, rows in layout order. A batch reads the values of its rows as a few
positioned reads per set and travels as CSR parts; it becomes dense on the device
(:mod:`state.tx.data.fast_batch`).

Reordering variable-length rows uses the two-pass bucket scheme of ``layout._scatter_matrix``:
pass 1 streams the source in order and appends each row to the bucket (a run of layout rows of
``BUCKET_BYTES`` values) it belongs to, pass 2 puts each bucket's rows in layout order in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from state.utils.errors import StateError

CHUNK_VALUES = 32 * 2**20  # source values read at once (x 8 bytes: values and gene indices)
BUCKET_VALUES = 64 * 2**20  # layout values put in order at once
FILES = ("data.f32", "indices.i32", "indptr.i64")


def x_node(handle: h5py.File) -> h5py.Dataset | h5py.Group:
    node = handle.get("X")
    if isinstance(node, h5py.Dataset) and node.ndim == 2:
        return node
    if isinstance(node, h5py.Group) and all(k in node for k in ("data", "indices", "indptr")):
        if str(node.attrs.get("encoding-type", "csr_matrix")) != "csr_matrix":
            raise StateError(f"X of {handle.filename} is stored as {node.attrs.get('encoding-type')}",
                             hint="rewrite the file with X as CSR (adata.X = scipy.sparse.csr_matrix(adata.X))")
        return node
    raise StateError(f"{handle.filename} has no dense or CSR matrix X", hint="drop X from --keys")


def x_shape(node: h5py.Dataset | h5py.Group) -> tuple[int, int]:
    if isinstance(node, h5py.Dataset):
        return int(node.shape[0]), int(node.shape[1])
    shape = node.attrs.get("shape")
    n = int(node["indptr"].shape[0]) - 1
    if shape is not None:
        return n, int(np.asarray(shape).reshape(-1)[1])
    indices = node["indices"]
    return n, int(indices[...].max()) + 1 if indices.shape[0] else 0


def _dense_chunks(node: h5py.Dataset) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    step = max(1, CHUNK_VALUES // max(1, node.shape[1]))
    for first in range(0, node.shape[0], step):
        block = np.asarray(node[first:first + step], dtype=np.float32)
        rows, cols = np.nonzero(block)
        indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=len(block)))].astype(np.int64)
        yield first, indptr, block[rows, cols], cols.astype(np.int32)


def _csr_chunks(node: h5py.Group, indptr: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    n, first = len(indptr) - 1, 0
    while first < n:
        stop = int(np.searchsorted(indptr, indptr[first] + CHUNK_VALUES, side="right")) - 1
        stop = min(n, max(stop, first + 1))
        a, b = int(indptr[first]), int(indptr[stop])
        yield (first, indptr[first:stop + 1] - a, np.asarray(node["data"][a:b], dtype=np.float32),
               np.asarray(node["indices"][a:b], dtype=np.int32))
        first = stop


def _row_lengths(node: h5py.Dataset | h5py.Group) -> tuple[np.ndarray, np.ndarray | None]:
    """Values per source row (and the source indptr for CSR)."""
    if isinstance(node, h5py.Group):
        indptr = np.asarray(node["indptr"][...], dtype=np.int64)
        return np.diff(indptr), indptr
    return np.concatenate([np.diff(c[1]) for c in _dense_chunks(node)] or [np.zeros(0, np.int64)]), None


def segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Element indices of the segments [starts[i], starts[i] + lengths[i]) one after another."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    out_first = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - out_first, lengths) + np.arange(total, dtype=np.int64)


def _pwrite(fd: int, values: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(values)).cast("B")
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread(fd: int, out: np.ndarray, offset: int, name: Path | str) -> None:
    view = memoryview(out).cast("B")
    while len(view):
        done = os.preadv(fd, [view], offset)
        if done <= 0:
            raise StateError(f"layout file {name} ends early (offset {offset}): it is truncated",
                             hint="rewrite the layout with `state tx index --toml <split.toml> --keys ...`")
        view, offset = view[done:], offset + done


def write_x(handle: h5py.File, folder: Path, order: np.ndarray, inverse: np.ndarray) -> tuple[int, int]:
    """Write ``X`` of ``handle`` in layout order (source row ``order[j]`` at layout row j); (n_genes, nnz)."""
    node = x_node(handle)
    n, n_genes = x_shape(node)
    if n != len(order):
        raise StateError(f"X of {handle.filename} has {n} rows, obs has {len(order)}")
    lengths, src_indptr = _row_lengths(node)
    lay_indptr = np.r_[0, np.cumsum(lengths[order])].astype(np.int64)
    nnz = int(lay_indptr[-1])
    lay_indptr.tofile(folder / "X.indptr.i64")
    # Pass 1 target: source rows grouped by the bucket of their layout row, in source order within it.
    bucket = lay_indptr[:-1][inverse] // BUCKET_VALUES
    staged_rows = np.argsort(bucket, kind="stable")
    staged_at = np.empty(n, np.int64)
    staged_at[staged_rows] = np.cumsum(lengths[staged_rows]) - lengths[staged_rows]
    paths = [folder / f"X.{name}" for name in FILES[:2]]
    for path in paths:
        with path.open("wb") as fh:
            fh.truncate(nnz * 4)
    if nnz == 0:
        return n_genes, 0
    fds = [os.open(p, os.O_RDWR) for p in paths]
    try:
        chunks = _csr_chunks(node, src_indptr) if src_indptr is not None else _dense_chunks(node)
        for first, indptr, data, indices in chunks:
            rows = np.arange(first, first + len(indptr) - 1)
            by_target = np.argsort(staged_at[rows], kind="stable")
            take = segments(indptr[:-1][by_target], np.diff(indptr)[by_target])
            data, indices = data[take], indices[take]
            at, ln = staged_at[rows[by_target]], lengths[rows[by_target]]
            breaks = np.flatnonzero(at[1:] != at[:-1] + ln[:-1]) + 1  # one write per bucket the chunk touches
            cuts = np.r_[0, np.cumsum(ln)][np.r_[0, breaks, len(at)]]
            for i in range(len(cuts) - 1):
                offset = int(at[np.r_[0, breaks][i]]) * 4
                for fd, part in zip(fds, (data, indices)):
                    _pwrite(fd, part[cuts[i]:cuts[i + 1]], offset)
        # Pass 2: each bucket's values into layout order.
        lay_bucket = lay_indptr[:-1] // BUCKET_VALUES
        edges = np.flatnonzero(np.r_[True, lay_bucket[1:] != lay_bucket[:-1], True])
        for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
            lo, hi = int(lay_indptr[a]), int(lay_indptr[b])
            src = order[a:b]  # source row of each layout row of the bucket
            take = segments(staged_at[src] - lo, lengths[src])
            for fd, dtype in zip(fds, (np.float32, np.int32)):
                held = np.empty(hi - lo, dtype)
                _pread(fd, held, lo * 4, folder)
                _pwrite(fd, held[take], lo * 4)
    finally:
        for fd in fds:
            os.close(fd)
    return n_genes, nnz


class CsrReader:
    """Reads rows of a layout's ``X`` as CSR parts (positioned reads; descriptors opened per process)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._pid = -1

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_pid": -1}

    def _open(self) -> None:
        if self._pid != os.getpid():
            self.indptr = np.memmap(self.folder / "X.indptr.i64", dtype=np.int64, mode="r")
            self.fds = [os.open(self.folder / f"X.{name}", os.O_RDONLY) for name in FILES[:2]]
            self._pid = os.getpid()

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        self._open()
        return self.indptr[rows + 1] - self.indptr[rows]

    def read(self, rows: np.ndarray, data: np.ndarray, indices: np.ndarray, at: np.ndarray) -> None:
        """Values of layout ``rows`` into data/indices at value offsets ``at`` (one read per run of
        rows consecutive both in the layout and in the output)."""
        self._open()
        if len(rows) == 0:
            return
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        ends = at + (stops - starts)
        breaks = np.flatnonzero((rows[1:] != rows[:-1] + 1) | (at[1:] != ends[:-1])) + 1
        firsts, lasts = np.r_[0, breaks], np.r_[breaks, len(rows)] - 1
        for f, last in zip(firsts.tolist(), lasts.tolist()):
            lo, hi, out = int(starts[f]), int(stops[last]), int(at[f])
            if hi > lo:
                _pread(self.fds[0], data[out:out + hi - lo], lo * 4, self.folder / "X.data.f32")
                _pread(self.fds[1], indices[out:out + hi - lo], lo * 4, self.folder / "X.indices.i32")
