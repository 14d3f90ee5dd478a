"""Streaming row access to h5ad files with h5py.

Only the requested cell is read: for CSR ``X`` the ``indptr`` pair, then that row's slice of
``data`` / ``indices``; for dense ``X`` one row. Files stay open in a small per-process LRU cache.
Handles are never pickled, so a reader can be handed to DataLoader worker processes, which then
open their own.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from state.utils.errors import StateError

SUPPORTED_ENCODINGS = ("csr_matrix", "array")


class H5RowReader:
    """Read single cells (dense float32 rows) from many h5ad files."""

    def __init__(self, *, max_open_files: int = 64) -> None:
        self.max_open_files = max_open_files
        self._files: OrderedDict[str, h5py.File] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"max_open_files": self.max_open_files, "_files": OrderedDict()}

    def _file(self, path: str) -> h5py.File:
        handle = self._files.get(path)
        if handle is not None:
            self._files.move_to_end(path)
            return handle
        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise StateError(f"cannot open {path} as HDF5 ({exc})", hint="check that it is an .h5ad file") from exc
        self._files[path] = handle
        if len(self._files) > self.max_open_files:
            _, oldest = self._files.popitem(last=False)
            oldest.close()
        return handle

    def encoding(self, path: str | Path) -> str:
        """The ``X`` encoding of a file (``csr_matrix`` or ``array``); anything else is an error."""
        x = self._x(str(path))
        enc = x.attrs.get("encoding-type")
        if isinstance(enc, bytes):
            enc = enc.decode()
        if enc is None and isinstance(x, h5py.Dataset):
            # h5ad files written before encoding attributes existed store dense X as a plain dataset.
            enc = "array"
        if enc not in SUPPORTED_ENCODINGS:
            raise StateError(
                f"{path}: X has encoding {enc!r}; SE training reads csr_matrix or dense X",
                hint="convert with adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(...)",
            )
        return str(enc)

    def _x(self, path: str):
        handle = self._file(path)
        if "X" not in handle:
            raise StateError(f"{path} has no X matrix", hint="write the counts to adata.X")
        return handle["X"]

    def shape(self, path: str | Path) -> tuple[int, int]:
        x = self._x(str(path))
        if isinstance(x, h5py.Dataset):
            return int(x.shape[0]), int(x.shape[1])
        shape = x.attrs.get("shape", x.attrs.get("h5sparse_shape"))
        if shape is None:
            raise StateError(f"{path}: sparse X has no shape attribute", hint="re-write it with anndata")
        return int(shape[0]), int(shape[1])

    def read_row(self, path: str | Path, row: int, num_genes: int) -> np.ndarray:
        """Cell ``row`` of ``X`` as a dense float32 vector of length ``num_genes``."""
        path = str(path)
        x = self._x(path)
        if isinstance(x, h5py.Dataset):
            values = np.asarray(x[row], dtype=np.float32).reshape(-1)
            if values.shape[0] != num_genes:
                raise StateError(
                    f"{path}: X has {values.shape[0]} genes but the dataset table says {num_genes}",
                    hint="fix num_genes in the CSV (state emb preprocess writes it)",
                )
            return values
        if self.encoding(path) != "csr_matrix":  # pragma: no cover - encoding() raises first
            raise AssertionError
        start, end = (int(v) for v in x["indptr"][row : row + 2])
        dense = np.zeros(num_genes, dtype=np.float32)
        if end > start:
            indices = np.asarray(x["indices"][start:end], dtype=np.int64)
            if indices.max() >= num_genes:
                raise StateError(
                    f"{path}: X has gene index {indices.max()} but the dataset table says {num_genes} genes",
                    hint="fix num_genes in the CSV (state emb preprocess writes it)",
                )
            dense[indices] = np.asarray(x["data"][start:end], dtype=np.float32)
        return dense

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
