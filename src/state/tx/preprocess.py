"""``state tx preprocess_train`` and ``state tx preprocess_infer``.

``preprocess_train`` turns raw counts into what training reads: scanpy ``normalize_total`` (median
target) and ``log1p`` applied in place on X, Seurat-flavour highly variable genes, and a dense float32
copy of the HVG columns in ``obsm['X_hvg']``. Memory stays close to one copy of the CSR matrix: the
normalization works on X's own buffers, the HVG statistics are accumulated chunk by chunk (scanpy's
``highly_variable_genes(flavor="seurat")`` would hold two extra copies of X), and only the HVG columns
are ever made dense.

``preprocess_infer`` builds a control template: every non-control cell gets the expression of a
randomly drawn control cell.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.io import anndata_checks as checks
from state.io.atomic import atomic_write_h5ad
from state.io.hvg_names import HVG_NAMES_KEY, as_names_array
from state.tx.data.layout import LayoutOptions
from state.utils.errors import StateError

log = logging.getLogger(__name__)

_ROW_CHUNK = 2048
_NNZ_CHUNK = 1 << 21
_LOG1P_HINT = "pass --input-is-log1p if X is already normalized and log1p-transformed"


def _rows(n: int):
    chunk = _ROW_CHUNK  # read at call time so tests can shrink it
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _to_float32(X):
    """CSR/dense X as float32 (integer or float64 storage is converted once; float32 is kept as is)."""
    if sp.issparse(X):
        if X.data.dtype != np.float32:
            X.data = X.data.astype(np.float32)
        return X
    return X if X.dtype == np.float32 else X.astype(np.float32)


def _expm1_mean_var(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance of ``expm1(X)``, as scanpy's Seurat flavour computes them
    (float32 values, float64 accumulators), without materializing ``expm1(X)``."""
    n_cells, n_genes = X.shape
    sums = np.zeros(n_genes)
    squares = np.zeros(n_genes)
    if sp.issparse(X):
        for part in range(0, X.nnz, _NNZ_CHUNK):
            values = np.expm1(X.data[part : part + _NNZ_CHUNK])
            cols = X.indices[part : part + _NNZ_CHUNK]
            sums += np.bincount(cols, weights=values, minlength=n_genes)
            squares += np.bincount(cols, weights=values * values, minlength=n_genes)
    else:
        for rows in _rows(n_cells):
            values = np.expm1(X[rows])
            sums += values.sum(axis=0, dtype=np.float64)
            squares += (values * values).sum(axis=0, dtype=np.float64)
    mean = sums / n_cells
    var = squares / n_cells - mean**2
    if n_cells > 1:
        var *= n_cells / (n_cells - 1)
    return mean, var


def seurat_hvg_table(X, *, num_hvgs: int, var_names, n_bins: int = 20) -> pd.DataFrame:
    """The table ``sc.pp.highly_variable_genes(flavor="seurat", n_top_genes=num_hvgs)`` adds to var.

    Log dispersion is z-scored within 20 equal-width bins of log mean expression; a gene alone in its
    bin gets a normalized dispersion of 1; every gene at or above the ``num_hvgs``-th highest
    normalized dispersion is selected (ties may select a few more). Checked against scanpy in tests.
    """
    mean, var = _expm1_mean_var(X)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    mean = np.log1p(mean)

    table = pd.DataFrame({"means": mean, "dispersions": dispersion}, index=pd.Index(var_names))
    mean_bin = pd.cut(table["means"], bins=n_bins)
    stats = table.groupby(mean_bin, observed=True)["dispersions"].agg(avg="mean", dev="std")
    lone = stats["dev"].isna()
    stats.loc[lone, "dev"] = stats.loc[lone, "avg"]
    stats.loc[lone, "avg"] = 0
    per_gene = stats.loc[mean_bin].set_index(table.index)
    norm = ((table["dispersions"] - per_gene["avg"]) / per_gene["dev"]).to_numpy()

    ranked = np.sort(norm[~np.isnan(norm)])[::-1]
    n_top = min(num_hvgs, ranked.size)
    cutoff = ranked[n_top - 1] if n_top else np.inf
    table["highly_variable"] = np.nan_to_num(norm, nan=-np.inf) >= cutoff
    table["dispersions_norm"] = norm.astype(np.float32)
    return table[["highly_variable", "means", "dispersions", "dispersions_norm"]]


def _row_block(X, rows: slice):
    """Rows of CSR ``X`` as a CSR matrix whose ``data`` is a view into ``X.data`` (no copy)."""
    lo, hi = X.indptr[rows.start], X.indptr[rows.stop]
    return sp.csr_matrix(
        (X.data[lo:hi], X.indices[lo:hi], X.indptr[rows.start : rows.stop + 1] - lo),
        shape=(rows.stop - rows.start, X.shape[1]),
        copy=False,
    )


def _warn_zero_count_cells(totals: np.ndarray) -> None:
    if not np.all(totals):
        log.warning("%d cells have zero counts; they stay all-zero", int(np.sum(totals == 0)))


def _normalize_total_csr(X) -> None:
    """``sc.pp.normalize_total`` (median target) on CSR ``X``, in place, one block of rows at a time.

    scanpy scales ``X.data`` through a full-size temporary and a full-size result; calling it per block
    with the global median as ``target_sum`` gives the same numbers with block-sized temporaries.
    """
    import anndata as ad
    import scanpy as sc

    totals = np.concatenate([np.asarray(_row_block(X, r).sum(axis=1), dtype=X.dtype).ravel()
                             for r in _rows(X.shape[0])])
    target = np.median(totals)  # scanpy's CSR path takes the median over all cells
    _warn_zero_count_cells(totals)
    for rows in _rows(X.shape[0]):
        block = _row_block(X, rows)
        lo, hi = X.indptr[rows.start], X.indptr[rows.stop]
        part = ad.AnnData(block)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-count cells were reported once above
            sc.pp.normalize_total(part, target_sum=target, inplace=True)
        X.data[lo:hi] = part.X.data


def _dense_columns(X, mask: np.ndarray) -> np.ndarray:
    """``X[:, mask]`` as dense float32, built row chunk by row chunk."""
    cols = np.flatnonzero(mask)
    out = np.empty((X.shape[0], cols.size), dtype=np.float32)
    for rows in _rows(X.shape[0]):
        block = X[rows][:, cols]
        out[rows] = block.toarray() if sp.issparse(block) else block
    return out


def _check_raw_counts(X, *, path, input_is_log1p: bool, uns) -> None:
    summary = checks.summarize_values(X)
    if input_is_log1p:
        checks.check_nonnegative_counts(X, slot="X", path=path, summary=summary)
        if not summary.has_fractional and summary.max_value > 30:
            log.warning("--input-is-log1p was given but X%s holds integers up to %g: it looks like raw counts",
                        f" of {path}" if path else "", summary.max_value)
        return
    if "log1p" in uns:
        raise StateError(
            f"{path or 'the input'} is already log-transformed (uns['log1p'] is present)", hint=_LOG1P_HINT
        )
    checks.check_nonnegative_counts(X, slot="X", path=path, summary=summary)
    if summary.has_fractional and summary.max_value <= 30:
        raise StateError(
            f"adata.X of {path or 'the input'} holds non-integer values no larger than {summary.max_value:.3g}: "
            "it looks log-transformed, expected raw counts",
            hint=_LOG1P_HINT,
        )
    if summary.has_fractional:
        log.warning("adata.X holds non-integer values; treating them as (normalized) counts")


def normalize_log1p_hvg(adata, *, num_hvgs: int, input_is_log1p: bool = False, path=None) -> None:
    """In place: check X, normalize_total + log1p (unless ``input_is_log1p``), HVGs, ``obsm['X_hvg']``."""
    if adata.n_obs == 0:
        raise StateError(f"{path or 'the input'} has no cells (shape 0 x {adata.n_vars})",
                         hint="pass the h5ad with the cells to train on")
    if num_hvgs < 1 or num_hvgs > adata.n_vars:
        raise StateError(
            f"--num_hvgs {num_hvgs} is out of range: {path or 'the input'} has {adata.n_vars} genes",
            hint=f"choose a value between 1 and {adata.n_vars}",
        )
    X = checks.require_csr(adata.X, slot="X", path=path, allow_dense=True, convert=True)
    _check_raw_counts(X, path=path, input_is_log1p=input_is_log1p, uns=adata.uns)
    adata.X = _to_float32(X)
    import scanpy as sc  # after the checks: bad input fails fast, without the slow import

    if not input_is_log1p:
        if sp.issparse(adata.X):
            _normalize_total_csr(adata.X)
        else:
            _warn_zero_count_cells(adata.X.sum(axis=1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reported once, through logging, above
                sc.pp.normalize_total(adata, inplace=True)
        sc.pp.log1p(adata)
    adata.uns.setdefault("log1p", {"base": None})

    table = seurat_hvg_table(adata.X, num_hvgs=num_hvgs, var_names=adata.var_names)
    for column in table.columns:
        adata.var[column] = table[column].to_numpy()
    adata.uns["hvg"] = {"flavor": "seurat"}
    adata.obsm["X_hvg"] = _dense_columns(adata.X, table["highly_variable"].to_numpy())
    adata.uns[HVG_NAMES_KEY] = as_names_array(adata.var_names[table["highly_variable"].to_numpy()])
    log.info("Stored %d HVG names in adata.uns['%s']", len(adata.uns[HVG_NAMES_KEY]), HVG_NAMES_KEY)
    log.info("selected %d highly variable genes (asked for %d)", int(table["highly_variable"].sum()), num_hvgs)


def _check_layout_inputs(adata, layout: LayoutOptions, *, path) -> None:
    """Everything ``--write-layout`` needs is there (checked before anything is written)."""
    checks.require_obs_columns(adata, [layout.pert_col, layout.cell_type_key, layout.batch_col], path=path,
                               hint="pass the layout's columns as --pert-col / --cell-type-key / --batch-col")
    for key in layout.keys:
        if key == "X_hvg":
            continue  # written by this command
        matrix = adata.obsm.get(key)
        if not isinstance(matrix, np.ndarray) or matrix.ndim != 2:
            raise StateError(f"obsm['{key}'] of {path} is missing or not a dense 2-D matrix",
                             hint="--layout-keys copies dense obsm matrices: X_hvg, or the embed_key you train on")


def preprocess_train(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    num_hvgs: int,
    input_is_log1p: bool = False,
    layout: LayoutOptions | None = None,
) -> Path:
    """Read raw counts, normalize + log1p + HVGs (see :func:`normalize_log1p_hvg`), write atomically.

    With ``layout``, also write the output's training layout (what ``state tx index`` writes for it)
    from the matrices in memory, so the rows are not read back from the new file.
    """
    out = checks.check_output_path(input_path, output_path)
    adata = checks.read_h5ad_checked(input_path)
    if layout is not None:
        _check_layout_inputs(adata, layout, path=input_path)
    normalize_log1p_hvg(adata, num_hvgs=num_hvgs, input_is_log1p=input_is_log1p, path=input_path)
    atomic_write_h5ad(adata, out)
    if layout is not None:
        layout.write(out, matrices={key: adata.obsm[key] for key in layout.keys})
    return out


def _replace_rows(matrix, targets: np.ndarray, sources: np.ndarray):
    """A copy of ``matrix`` whose row ``targets[i]`` is row ``sources[i]`` (CSR stays CSR)."""
    index = np.arange(matrix.shape[0])
    index[targets] = sources
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix)[index]
    if isinstance(matrix, pd.DataFrame):
        return matrix.iloc[index].set_axis(matrix.index)
    return np.asarray(matrix)[index]


def preprocess_infer(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    control_condition: str,
    pert_col: str,
    seed: int = 42,
) -> Path:
    """Control template: each non-control cell's X row (and every cell-length obsm row) is replaced by the
    row of a control cell drawn with replacement (``numpy.random.RandomState(seed)``); obs is kept."""
    out = checks.check_output_path(input_path, output_path)
    adata = checks.read_h5ad_checked(input_path)
    checks.require_obs_columns(adata, [pert_col], path=input_path, hint="pass the perturbation column as --pert_col")
    column = adata.obs[pert_col]
    if isinstance(column.dtype, pd.CategoricalDtype) and control_condition in column.cat.categories:
        if not (column == control_condition).any():
            raise StateError(
                f"no cells in {input_path} have {pert_col}={control_condition!r} (it is an unused category)",
                hint="a control template needs control cells; check --control_condition and --pert_col",
            )
    is_control = checks.require_label_present(
        adata, pert_col, control_condition, path=input_path,
        hint="pass the control label of that column as --control_condition",
    )
    controls = np.flatnonzero(is_control)
    perturbed = np.flatnonzero(~is_control)
    sources = controls[np.random.RandomState(seed).randint(0, controls.size, size=perturbed.size)]
    if adata.X is not None:
        adata.X = _replace_rows(adata.X, perturbed, sources)
    for key in list(adata.obsm.keys()):
        adata.obsm[key] = _replace_rows(adata.obsm[key], perturbed, sources)
    for key in list(adata.layers.keys()):
        adata.layers[key] = _replace_rows(adata.layers[key], perturbed, sources)
    log.info("replaced %d perturbed cells with %d control cells", perturbed.size, controls.size)
    atomic_write_h5ad(adata, out)
    return out
