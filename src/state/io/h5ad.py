"""Read the parts of an h5ad file (obs, var, single arrays) with h5py, without loading X.

Used by ``state emb transform`` (which streams X itself), ``state emb query`` and ``state emb eval``.
"""

from __future__ import annotations

import os

import pandas as pd

from state.utils.errors import StateError


def open_h5ad(path: str | os.PathLike, *, flag: str = "--input"):
    """Open an h5ad read-only with h5py, with one-line errors for missing / non-HDF5 files."""
    import h5py

    from state.io.anndata_checks import check_h5ad_path

    return h5py.File(check_h5ad_path(path, flag=flag), "r")


def _read_elem(node):
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(node)


def read_obs(handle) -> pd.DataFrame:
    if "obs" not in handle:
        raise StateError(f"{handle.filename} has no obs", hint="write the file with anndata")
    return _read_elem(handle["obs"])


def read_var(handle) -> pd.DataFrame:
    if "var" not in handle:
        raise StateError(f"{handle.filename} has no var", hint="write the file with anndata")
    return _read_elem(handle["var"])
