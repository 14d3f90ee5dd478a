"""Integer counts from log1p predictions, for scorers that take raw counts (cell-eval2, VCC 2026).

The model predicts log1p of library-size-normalised expression, clipped to [0, 14]. That keeps
each cell's *proportions* but not its sequencing depth, so the back-transform needs a depth from
somewhere; we take it from the control cells of the same input, which are real measurements of
the same cells the simulation starts from:

1. ``e = expm1(clip(prediction, 0, 14))`` -- normalised expression; ``q = e / sum(e)`` per cell.
2. Each output cell gets a library size ``L`` drawn with replacement from the observed library
   sizes of the control cells of its cell type (all controls when there is no cell-type column).
   A library size is the cell's sum of raw counts, read from the first of ``layers['counts']``,
   ``raw.X`` or ``X`` that holds whole numbers. When only log1p values are present the fallback
   is ``sum(expm1(X))`` -- the normalisation target, not the true depth -- and a warning says so.
3. ``L * q`` is made integral by a seeded rule: ``stochastic`` rounding (floor, then +1 with
   probability equal to the fractional part: unbiased, at most one count off per gene) or
   ``multinomial`` sampling of ``L`` reads (the sampling noise of a real library).

Everything random comes from ``numpy.random.default_rng([seed, 2026])``, so the output is fixed
for a given ``--seed`` and independent of the simulation's own random stream. The rule and its
inputs are recorded in ``uns['state_counts']``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp

from state.utils.errors import StateError

log = logging.getLogger(__name__)

METHODS = ("stochastic", "multinomial")
CLIP_MAX = 14.0
_STREAM_TAG = 2026  # keeps this stream apart from the simulation's RNG for the same seed
_CHUNK_ROWS = 2048  # rows converted at a time: bounds the float64 working copies


@dataclass
class LibrarySizes:
    """Observed control library sizes per group, and where they were read from."""

    by_group: dict[str, np.ndarray]
    source: str


def _whole_numbers(matrix) -> bool:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    sample = values.ravel()[:1_000_000]
    return bool(sample.size) and bool(np.all(sample >= 0)) and bool(np.all(np.mod(sample, 1) == 0))


def _row_sums(matrix) -> np.ndarray:
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()


def _raw_library_sizes(adata: ad.AnnData) -> tuple[np.ndarray, str]:
    """Per-cell depth from the first slot that holds raw counts, else the log1p fallback."""
    candidates = [
        ("layers['counts']", adata.layers["counts"] if "counts" in adata.layers else None),
        ("raw.X", adata.raw.X if adata.raw is not None and adata.raw.n_obs == adata.n_obs else None),
        ("X", adata.X),
    ]
    for name, matrix in candidates:
        if matrix is not None and _whole_numbers(matrix):
            return _row_sums(matrix), name
    log.warning("no raw counts in the input (layers['counts'], raw.X or X): library sizes are sum(expm1(X)), "
                "the normalisation target rather than the sequencing depth")
    x = adata.X
    expm1 = x.expm1() if sp.issparse(x) else np.expm1(np.asarray(x, dtype=np.float64))
    return _row_sums(expm1), "sum(expm1(X))"


def control_library_sizes(adata: ad.AnnData, is_control: np.ndarray, groups: np.ndarray) -> LibrarySizes:
    """Observed library sizes of the control cells, split by ``groups`` (cell types)."""
    if not is_control.any():
        raise StateError("--output-counts needs control cells in the input to take library sizes from",
                         hint="add control cells, or drop --output-counts")
    sizes, source = _raw_library_sizes(adata)
    by_group = {str(g): sizes[is_control & (groups == g)] for g in np.unique(groups)}
    by_group["*"] = sizes[is_control]
    if not np.all(by_group["*"] > 0):
        raise StateError(f"some control cells have a library size of 0 ({source})",
                         hint="drop empty cells from the input before inference")
    return LibrarySizes(by_group=by_group, source=source)


def draw_library_sizes(libraries: LibrarySizes, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One library size per output cell, drawn from its group's controls (all controls if it has none)."""
    out = np.empty(len(groups), dtype=np.float64)
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        pool = libraries.by_group.get(str(group))
        if pool is None or pool.size == 0:
            pool = libraries.by_group["*"]
        out[rows] = rng.choice(pool, size=rows.size, replace=True)
    return np.rint(out)


def _integral_block(log1p: np.ndarray, library_sizes: np.ndarray, method: str,
                    rng: np.random.Generator) -> np.ndarray:
    expression = np.expm1(np.clip(np.asarray(log1p, dtype=np.float64), 0.0, CLIP_MAX))
    totals = expression.sum(axis=1, keepdims=True)
    proportions = np.divide(expression, totals, out=np.zeros_like(expression), where=totals > 0)
    if method == "multinomial":
        reads = np.where(totals[:, 0] > 0, library_sizes, 0).astype(np.int64)
        proportions /= np.maximum(proportions.sum(axis=1, keepdims=True), 1.0)  # float error may exceed 1
        return rng.multinomial(reads, proportions)
    expected = proportions * library_sizes[:, None]
    floor = np.floor(expected)
    return floor + (rng.random(expected.shape) < (expected - floor))


def log1p_to_counts(log1p, library_sizes: np.ndarray, *, method: str = "stochastic",
                    rng: np.random.Generator) -> sp.csr_matrix:
    """Integer counts whose proportions follow ``expm1(log1p)`` and whose totals are ``library_sizes``.

    Converted in blocks of rows, in order, so the result depends only on the generator's state.
    """
    if method not in METHODS:
        raise StateError(f"unknown counts method '{method}'", hint=f"use one of {', '.join(METHODS)}")
    blocks = []
    for start in range(0, log1p.shape[0], _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        block = log1p[rows]
        block = block.toarray() if sp.issparse(block) else block
        counts = _integral_block(block, library_sizes[rows], method, rng)
        blocks.append(sp.csr_matrix(counts.astype(np.int32)))
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix(log1p.shape, dtype=np.int32)


def counts_record(*, method: str, seed: int, libraries: LibrarySizes) -> dict:
    """What ``uns['state_counts']`` says about the transform (h5ad-friendly values only)."""
    pool = libraries.by_group["*"]
    return {
        "transform": "counts = integer rounding (method) of L * q; q = expm1(clip(pred, 0, 14)) normalised to sum 1; "
                     "L = library size drawn from the controls",
        "method": method,
        "seed": int(seed),
        "library_size_source": libraries.source,
        "library_size_pool": "control cells of the same cell type (all controls if none)",
        "n_control_cells": int(pool.size),
        "control_library_size_median": float(np.median(pool)),
        "clip_max": CLIP_MAX,
    }


@dataclass
class CountsPlan:
    """What ``--output-counts`` needs from the input before its X is replaced by predictions."""

    libraries: LibrarySizes
    groups: np.ndarray  # cell type of every input row ("all" without a cell-type column)
    method: str
    seed: int


def plan_counts(adata: ad.AnnData, columns, *, method: str, seed: int, output_space: str,
                output) -> CountsPlan:
    """Check the request and read the control library sizes (``columns``: resolved input roles)."""
    if method not in METHODS:
        raise StateError(f"unknown counts method '{method}'", hint=f"use one of {', '.join(METHODS)}")
    if str(output).lower().endswith(".npy"):
        raise StateError("--output-counts writes an h5ad (counts with cell labels)", hint="use an --output ending in .h5ad")
    if output_space not in ("gene", "all"):
        raise StateError(f"--output-counts needs a gene-space model (this one predicts in '{output_space}' space)",
                         hint="drop --output-counts")
    groups = cell_groups(adata, columns)
    is_control = columns.labels(adata) == columns.control
    return CountsPlan(control_library_sizes(adata, is_control, groups), groups, method, int(seed))


def cell_groups(adata: ad.AnnData, columns) -> np.ndarray:
    """The library-size pool of every row: its cell type ("all" without a cell-type column)."""
    if columns.celltype_col:
        return adata.obs[columns.celltype_col].astype(str).to_numpy()
    return np.full(adata.n_obs, "all", dtype=object)


def prediction_in_x(*, embed_key: str | None, output_space: str, preds: np.ndarray, counts, n_vars: int) -> bool:
    """Whether infer wrote gene-space predictions to X (the slots of ``run.write_predictions``)."""
    if embed_key is None:
        return preds.shape[1] == n_vars
    return output_space == "all" and counts is not None and counts.shape[1] == n_vars


def apply_counts(plan: CountsPlan, adata: ad.AnnData, *, in_x: bool) -> ad.AnnData:
    """Replace X (the predicted log1p values) by integer counts; record the rule in ``uns``."""
    if not in_x:
        raise StateError("--output-counts needs gene-space predictions in X, but this run wrote them to obsm",
                         hint="run without --embed-key on a gene-space model, or drop --output-counts")
    rng = np.random.default_rng([plan.seed, _STREAM_TAG])
    sizes = draw_library_sizes(plan.libraries, plan.groups, rng)
    adata.X = log1p_to_counts(adata.X, sizes, method=plan.method, rng=rng)
    adata.uns["state_counts"] = counts_record(method=plan.method, seed=plan.seed, libraries=plan.libraries)
    return adata


__all__ = ["METHODS", "CountsPlan", "LibrarySizes", "apply_counts", "control_library_sizes", "draw_library_sizes",
           "cell_groups", "log1p_to_counts", "plan_counts", "prediction_in_x"]
