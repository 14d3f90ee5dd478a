"""Checks at the AnnData boundary.

Every problem is raised as a :class:`~state.utils.errors.StateError` whose message names the
file, the slot (``adata.obs['gene']``, ``adata.X`` ...), what was expected and what was found, with
the fix as the hint. Value checks on sparse matrices look only at the stored entries and walk them
in chunks, so a large matrix is never densified.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.utils.errors import StateError

log = logging.getLogger(__name__)

_CHUNK = 1 << 22  # entries per chunk for value scans (16 MiB of float32)


def _where(path: str | os.PathLike | None) -> str:
    return f" of {path}" if path else ""


def _preview(values, limit: int = 8) -> str:
    values = [str(v) for v in values]
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in total)" if len(values) > limit else "")


def check_h5ad_path(path: str | os.PathLike, *, flag: str = "--adata") -> Path:
    """An existing HDF5 file, or a one-line error naming ``flag`` (missing file, folder, not HDF5)."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise StateError(f"input file {p} does not exist", hint=f"check the input path ({flag})")
    if p.is_dir():
        raise StateError(f"input {p} is a directory, expected an .h5ad file", hint="pass the path of the .h5ad file")
    if not h5py.is_hdf5(p):
        raise StateError(
            f"input {p} is not an h5ad file (it is not HDF5)",
            hint="pass an AnnData file written by anndata/scanpy (adata.write_h5ad)",
        )
    return p


def read_h5ad_checked(path: str | os.PathLike, *, backed: str | None = None, flag: str = "--adata"):
    """Read an h5ad, turning the usual mistakes (missing file, folder, not HDF5) into one-line errors."""
    import anndata as ad

    p = check_h5ad_path(path, flag=flag)
    try:
        return ad.read_h5ad(p, backed=backed)
    except Exception as exc:  # anndata raises many types for a malformed file
        raise StateError(
            f"input {p} could not be read as AnnData: {type(exc).__name__}: {exc}",
            hint="check that the file is a complete .h5ad written by anndata",
        ) from exc


def require_obs_columns(adata, cols, *, path=None, hint: str | None = None) -> None:
    """Every column in ``cols`` must be in ``adata.obs``."""
    missing = [c for c in cols if c not in adata.obs.columns]
    if missing:
        raise StateError(
            f"column {_preview(missing)} not found in adata.obs{_where(path)}; "
            f"available columns: {_preview(adata.obs.columns) or 'none'}",
            hint=hint or "pass the name of an existing obs column",
        )


def require_categorical(adata, col: str, *, path=None, convert: bool = True) -> None:
    """``adata.obs[col]`` must be categorical; with ``convert`` it is converted in memory (and logged)."""
    if isinstance(adata.obs[col].dtype, pd.CategoricalDtype):
        return
    if convert:
        log.info("adata.obs[%r]%s is %s, converting it to categorical", col, _where(path), adata.obs[col].dtype)
        adata.obs[col] = adata.obs[col].astype(str).astype("category")
        return
    raise StateError(
        f"adata.obs[{col!r}]{_where(path)} must be categorical, found dtype {adata.obs[col].dtype}",
        hint=f"run adata.obs[{col!r}] = adata.obs[{col!r}].astype('category') and write the file again",
    )


def require_csr(matrix, *, slot: str = "X", path=None, allow_dense: bool = True, convert: bool = False):
    """Return ``matrix`` if it is CSR (or dense where allowed); convert CSC/COO when ``convert``."""
    if sp.issparse(matrix):
        if matrix.format == "csr":
            return matrix
        if convert:
            log.info("adata.%s%s is %s, converting to CSR", slot, _where(path), matrix.format.upper())
            return sp.csr_matrix(matrix)
        raise StateError(
            f"adata.{slot}{_where(path)} must be a CSR sparse matrix, found {matrix.format.upper()}",
            hint=f"run adata.{slot} = scipy.sparse.csr_matrix(adata.{slot}) and write the file again",
        )
    if isinstance(matrix, np.ndarray) and allow_dense:
        return matrix
    raise StateError(
        f"adata.{slot}{_where(path)} must be a CSR sparse matrix, found {type(matrix).__name__}",
        hint=f"run adata.{slot} = scipy.sparse.csr_matrix(adata.{slot}) and write the file again",
    )


def gene_names(adata, column: str | None = None) -> np.ndarray:
    """Gene names as strings: ``var[column]`` if given, else ``var['gene_name']``, else ``var_names``."""
    if column is not None:
        if column not in adata.var.columns:
            raise StateError(
                f"column {column!r} not found in adata.var; available columns: {_preview(adata.var.columns) or 'none'}",
                hint="pass the var column holding gene names, or omit it to use var_names",
            )
        return adata.var[column].astype(str).to_numpy()
    if "gene_name" in adata.var.columns:
        return adata.var["gene_name"].astype(str).to_numpy()
    return adata.var_names.astype(str).to_numpy()


@dataclass(frozen=True)
class ValueSummary:
    """Counts of problem values among the stored entries of a matrix."""

    n_nan: int
    n_inf: int
    n_negative: int
    has_fractional: bool
    max_value: float


def _stored_chunks(matrix):
    """The stored values of a sparse or dense matrix as 1-D chunks (views, no full copy)."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).reshape(-1)
    for start in range(0, values.size, _CHUNK):
        yield values[start : start + _CHUNK]


def summarize_values(matrix) -> ValueSummary:
    """One chunked pass over the stored values: NaN, inf, negatives, fractional values, max."""
    n_nan = n_inf = n_neg = 0
    fractional = False
    max_value = -np.inf
    for chunk in _stored_chunks(matrix):
        if not np.issubdtype(chunk.dtype, np.floating):
            n_neg += int(np.count_nonzero(chunk < 0))
            if chunk.size:
                max_value = max(max_value, float(chunk.max()))
            continue
        finite = np.isfinite(chunk)
        n_bad = chunk.size - int(np.count_nonzero(finite))
        if n_bad:
            n_nan += int(np.count_nonzero(np.isnan(chunk)))
            n_inf += n_bad - int(np.count_nonzero(np.isnan(chunk)))
            chunk = chunk[finite]
        n_neg += int(np.count_nonzero(chunk < 0))
        if chunk.size:
            max_value = max(max_value, float(chunk.max()))
            fractional = fractional or bool(np.any(np.modf(chunk)[0]))
    return ValueSummary(n_nan, n_inf, n_neg, fractional, max_value if np.isfinite(max_value) else 0.0)


def check_finite(matrix, *, slot: str = "X", path=None, summary: ValueSummary | None = None) -> ValueSummary:
    """No NaN or infinite entries."""
    s = summary or summarize_values(matrix)
    if s.n_nan or s.n_inf:
        found = " and ".join(f"{n} {kind}" for n, kind in ((s.n_nan, "NaN"), (s.n_inf, "infinite")) if n)
        raise StateError(
            f"adata.{slot}{_where(path)} contains {found} values, expected finite values",
            hint="remove or fix those entries (e.g. filter the affected cells) before preprocessing",
        )
    return s


def check_nonnegative_counts(matrix, *, slot: str = "X", path=None, summary: ValueSummary | None = None):
    """Finite and non-negative entries, as raw counts must be."""
    s = check_finite(matrix, slot=slot, path=path, summary=summary)
    if s.n_negative:
        raise StateError(
            f"adata.{slot}{_where(path)} contains {s.n_negative} negative values, expected non-negative raw counts",
            hint="pass raw (or normalized, non-negative) counts, not scaled/centered data",
        )
    return s


def require_label_present(adata, col: str, label: str, *, path=None, hint: str | None = None) -> np.ndarray:
    """``label`` must occur in ``adata.obs[col]``; returns the boolean mask of matching cells."""
    values = adata.obs[col].astype(str).to_numpy()
    mask = values == str(label)
    if not mask.any():
        present = sorted(pd.unique(values))
        raise StateError(
            f"label {label!r} not found in adata.obs[{col!r}]{_where(path)}; present labels: {_preview(present)}",
            hint=hint or "pass a label that occurs in that column",
        )
    return mask


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike) -> Path:
    """Refuse an output that would overwrite the input or that cannot be created; creates nothing."""
    src, out = Path(input_path), Path(output_path)
    if out.resolve() == src.resolve() or (out.exists() and src.exists() and out.samefile(src)):
        raise StateError(
            f"output {out} is the input file", hint="write to a new file; the input is never overwritten"
        )
    if out.is_dir():
        raise StateError(f"output {out} is a directory", hint="pass a file path such as out/processed.h5ad")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StateError(
            f"cannot create output {out}: {ancestor} is a file, not a folder",
            hint="choose an output path in a folder you can write to",
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise StateError(
            f"output folder {ancestor} is not writable", hint="choose an output path in a folder you can write to"
        )
    return out


def obsm_matrix(adata, embed_key: str, *, hint: str = "pass embed_key=<existing obsm key>"):
    """``adata.obsm[embed_key]`` as a dense C-contiguous float32 2-D array, or a one-line error."""
    import numpy as np

    if embed_key not in adata.obsm:
        raise StateError(f"obsm['{embed_key}'] not found (obsm keys: {', '.join(adata.obsm.keys()) or 'none'})",
                         hint=hint)
    matrix = adata.obsm[embed_key]
    matrix = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
    if matrix.ndim != 2:
        raise StateError(f"obsm['{embed_key}'] is not a 2-D matrix (shape {matrix.shape})", hint=hint)
    return np.ascontiguousarray(matrix, dtype=np.float32)
