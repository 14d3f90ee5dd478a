"""``state tx infer``: simulate perturbations on the cells of an h5ad with a trained run.

The algorithm follows arc-state 0.11.1 so results match its output for the same seed:

1. Every row is predicted, controls included. Rows are grouped by cell type (sorted), then by
   perturbation label (sorted), and cut in file order into windows of at most ``set_len`` cells.
2. Each window gets basal cells drawn with replacement from its cell type's controls (falling back
   to all controls) by ONE ``numpy.random.RandomState(seed)`` shared across the whole run, in the
   order above. Planning every draw first keeps that stream fixed however the forward passes are
   batched afterwards.
3. Windows then run through the model; sets never interact, so windows of equal length are
   stacked into one forward pass (same numbers, far fewer calls).

Only the input, the output matrices and one batch of windows are held in memory.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from state.utils.errors import StateError
from state.utils.progress import progress

log = logging.getLogger(__name__)

CLIP_MAX = 14.0


@dataclass(frozen=True)
class Window:
    rows: np.ndarray  # input rows written by this window, file order
    basal: np.ndarray  # input rows used as control (basal) cells
    pert: str
    group: str


def plan_windows(
    labels: np.ndarray, groups: np.ndarray, *, control: str, set_len: int, seed: int
) -> tuple[list[Window], list[str]]:
    """Cut rows into windows and draw their basal cells, in arc-state's order.

    Returns the windows and the groups skipped for lack of any control cell.
    """
    rng = np.random.RandomState(seed)
    # Integer codes (hash-based, uniques sorted as np.unique sorts them) instead of repeated
    # comparisons and sorts of string arrays: the same windows, several times faster on big inputs.
    label_codes, label_names = pd.factorize(labels, sort=True)
    group_codes, group_names = pd.factorize(groups, sort=True)
    is_control = labels == control
    all_controls = np.flatnonzero(is_control)
    rows_by_group = np.argsort(group_codes, kind="stable")
    group_bounds = np.concatenate([[0], np.cumsum(np.bincount(group_codes, minlength=len(group_names)))])
    windows: list[Window] = []
    skipped: list[str] = []
    for g, group in enumerate(group_names):
        in_group = rows_by_group[group_bounds[g] : group_bounds[g + 1]]  # file order
        pool = in_group[is_control[in_group]]
        if pool.size == 0:
            pool = all_controls
        if pool.size == 0:
            skipped.append(str(group))
            continue
        present, inverse = np.unique(label_codes[in_group], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=present.size))])
        for k, code in enumerate(present):
            rows = in_group[order[bounds[k] : bounds[k + 1]]]
            pert = str(label_names[code])
            for start in range(0, rows.size, set_len):
                chunk = rows[start : start + set_len]
                basal = rng.choice(pool, size=chunk.size, replace=True)
                windows.append(Window(rows=chunk, basal=basal, pert=pert, group=str(group)))
    return windows, skipped


def feature_reader(adata: ad.AnnData, embed_key: str | None) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """Return ``rows -> float32 dense features`` for ``.X`` or ``obsm[embed_key]``, and the width."""
    if embed_key is None:
        matrix = adata.X
        if matrix is None:
            raise StateError("the input h5ad has no X matrix", hint="pass --embed-key to read features from obsm")
    else:
        if embed_key not in adata.obsm:
            raise StateError(
                f"obsm['{embed_key}'] not found in the input (available: {', '.join(adata.obsm.keys()) or 'none'})",
                hint="pass --embed-key naming an existing obsm matrix, or omit it to use .X",
            )
        matrix = adata.obsm[embed_key]
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)

        def read(rows: np.ndarray) -> np.ndarray:
            return np.asarray(matrix[rows].toarray(), dtype=np.float32)
    else:
        matrix = np.asarray(matrix)

        def read(rows: np.ndarray) -> np.ndarray:
            return np.asarray(matrix[rows], dtype=np.float32)

    return read, int(matrix.shape[1])


@dataclass
class SimulationResult:
    preds: np.ndarray  # [n_cells, output_dim], rows without a control pool keep NaN
    counts: np.ndarray | None  # decoded gene-space predictions when the model has a decoder
    done: np.ndarray  # bool [n_cells]: rows that were predicted
    basal: np.ndarray | None = None  # [n_cells]: the input row each row's basal cell came from, -1 if none


def basal_rows(windows: list[Window], n_cells: int) -> np.ndarray:
    """The basal (control) input row each row was simulated from; -1 where none."""
    basal = np.full(n_cells, -1, dtype=np.int64)
    for window in windows:
        basal[window.rows] = window.basal
    return basal


def simulate(
    predictor,
    windows: list[Window],
    read_features: Callable[[np.ndarray], np.ndarray],
    *,
    n_cells: int,
    pert_vectors: Callable[[str], np.ndarray],
    batch_index: np.ndarray | None,
    cell_types: np.ndarray | None = None,
    max_cells_per_call: int = 4096,
    quiet: bool = False,
) -> SimulationResult:
    """Run every window through ``predictor`` (see :class:`state.tx.infer.predictor.SetPredictor`)."""
    preds: np.ndarray | None = None
    counts: np.ndarray | None = None
    done = np.zeros(n_cells, dtype=bool)
    by_len: dict[int, list[Window]] = defaultdict(list)
    for w in windows:
        by_len[w.rows.size].append(w)
    total = sum(w.rows.size for w in windows)
    bar = progress(total=total, desc="infer", unit="cells", disable=True if quiet else None)
    with torch.inference_mode():
        for set_len, group in sorted(by_len.items()):
            per_call = max(1, max_cells_per_call // set_len)
            for start in range(0, len(group), per_call):
                chunk = group[start : start + per_call]
                ctrl = np.stack([read_features(w.basal) for w in chunk])  # [B, S, D]
                own = np.stack([read_features(w.rows) for w in chunk])  # [B, S, D]
                vectors = [pert_vectors(w.pert) for w in chunk]
                pert = np.stack([np.broadcast_to(v, (set_len, v.size)) for v in vectors])  # [B, S, P]
                batch = None if batch_index is None else np.stack([batch_index[w.rows] for w in chunk])
                names = [w.pert for w in chunk]
                types = None if cell_types is None else [cell_types[w.rows] for w in chunk]
                out_preds, out_counts = predictor.predict_sets(
                    ctrl=ctrl, pert=pert, batch=batch, pert_names=names, own=own, cell_types=types
                )
                rows = np.concatenate([w.rows for w in chunk])
                if preds is None:
                    preds = np.full((n_cells, out_preds.shape[-1]), np.nan, dtype=np.float32)
                preds[rows] = out_preds.reshape(-1, out_preds.shape[-1])
                if out_counts is not None:
                    if counts is None:
                        counts = np.full((n_cells, out_counts.shape[-1]), np.nan, dtype=np.float32)
                    counts[rows] = out_counts.reshape(-1, out_counts.shape[-1])
                done[rows] = True
                bar.update(rows.size)
    bar.close()
    if preds is None:
        preds = np.full((n_cells, 0), np.nan, dtype=np.float32)
    return SimulationResult(preds=preds, counts=counts, done=done)
