"""Cell sentences for the SE model: gene mapping, ranking, sampling, counts.

Works on CSR row blocks without densifying them. Sampling randomness comes from an explicit
``numpy.random.Generator`` per block of ``SAMPLING_BLOCK`` rows, seeded from ``(seed, block index)``
when a seed is given, so a seeded run is bit-identical whatever the batch or chunk size.
arc-state seeds nothing; ``seed=None`` keeps that behaviour (fresh entropy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.utils.errors import StateError

log = logging.getLogger(__name__)

SAMPLING_BLOCK = 1024  # rows per RNG stream; fixed so seeded output does not depend on chunking
MIN_MAPPED_GENES = 10
RAW_MAX_THRESHOLD = 35.0
RAW_EXPM1_SUM_THRESHOLD = 5_000_000.0


# ---------------------------------------------------------------------------------------------- genes
@dataclass(frozen=True)
class GeneMapping:
    """Input genes (var order) -> global vocabulary index, -1 for genes outside the vocabulary."""

    source: str  # "var.index" or "var.<column>"
    local_to_global: np.ndarray  # int64 [n_genes]

    @property
    def n_genes(self) -> int:
        return int(self.local_to_global.shape[0])

    @property
    def valid(self) -> np.ndarray:
        return self.local_to_global >= 0

    @property
    def n_mapped(self) -> int:
        return int(self.valid.sum())

    @property
    def filtered_global_ids(self) -> np.ndarray:
        """Global ids of the vocabulary genes, in var order (the "local" gene order of a sentence)."""
        return self.local_to_global[self.valid]


def _names(values) -> pd.Series:
    series = pd.Series(values)
    return series[series.notna()].astype(str)


def _overlap(values, vocab: dict[str, int]) -> int:
    return len(set(_names(values)).intersection(vocab))


def detect_gene_names(var: pd.DataFrame, vocab: dict[str, int]) -> tuple[str | None, dict[str, int]]:
    """arc-state's auto-detection: the index, then every var column, by distinct names in the
    vocabulary; the first candidate with the strictly largest overlap wins (ties go to the index).
    Returns (column or None for the index, overlap per candidate)."""
    overlaps = {"var.index": _overlap(var.index, vocab)}
    best, best_n = None, overlaps["var.index"]
    for column in var.columns:
        n = _overlap(var[column], vocab)
        overlaps[f"var.{column}"] = n
        if n > best_n:
            best, best_n = column, n
    return best, overlaps


def map_genes(
    var: pd.DataFrame,
    vocab: dict[str, int],
    *,
    gene_column: str | None = None,
    min_mapped: int = MIN_MAPPED_GENES,
    where: str = "input",
) -> GeneMapping:
    """Map the input's genes to the vocabulary (exact, case-sensitive names).

    With ``gene_column`` that column is used. Without it arc-state's rule applies: the var index
    whenever any of its names matches, otherwise the auto-detected column.
    """
    if gene_column is not None and gene_column not in {"index", "var_names"}:
        if gene_column not in var.columns:
            raise StateError(
                f"{where}: no var column '{gene_column}' (columns: {', '.join(map(str, var.columns)) or 'none'})",
                hint="pass --gene-column with one of the var columns, or leave it out to auto-detect",
            )
        names, source = var[gene_column], f"var.{gene_column}"
    elif gene_column in {"index", "var_names"}:
        names, source = var.index, "var.index"
    else:
        best, overlaps = detect_gene_names(var, vocab)
        if overlaps["var.index"] > 0:
            names, source = var.index, "var.index"
            if best is not None:
                log.warning(
                    "var column '%s' matches %d vocabulary genes but var.index (%d) is used, as arc-state does; "
                    "pass --gene-column %s to use the column", best, overlaps[f"var.{best}"],
                    overlaps["var.index"], best,
                )
        elif best is not None:
            names, source = var[best], f"var.{best}"
        else:
            raise StateError(
                f"{where}: no gene names in var.index or any var column match the model's "
                f"{len(vocab)}-gene vocabulary (checked {', '.join(overlaps)})",
                hint="store gene symbols as in the protein-embedding file (case-sensitive) in a var column",
            )
    series = pd.Series(np.asarray(names, dtype=object))
    local_to_global = np.array(
        [vocab.get(str(name), -1) if pd.notna(name) else -1 for name in series], dtype=np.int64
    )
    mapping = GeneMapping(source=source, local_to_global=local_to_global)
    log.info("%d genes mapped to embedding file (out of %d), names from %s", mapping.n_mapped, mapping.n_genes, source)
    if mapping.n_mapped < min_mapped:
        raise StateError(
            f"{where}: only {mapping.n_mapped} of {mapping.n_genes} genes in {source} match the model's "
            f"{len(vocab)}-gene vocabulary (need at least {min_mapped})",
            hint="pass --gene-column with the var column that holds gene symbols",
        )
    return mapping


# ---------------------------------------------------------------------------------------------- sentences
def block_rng(seed: int | None, block_index: int) -> np.random.Generator:
    return np.random.default_rng(None if seed is None else [int(seed), int(block_index)])


class SentenceBuilder:
    """Turn expression rows into (gene ids, counts) sentences of length ``pad_length``.

    Per cell: negatives clipped, raw counts log1p'd (max > 35 or sum(expm1) > 5e6),
    genes outside the vocabulary dropped, weights w = x / sum(x) (uniform if the sum is 0).
    Slots 1.. hold the top-expressed genes (ties in random order), then random zero-expression
    genes (without replacement when the cell has >= pad_length - 1 vocabulary genes, with
    replacement otherwise). Slot 0 holds the id of local gene ``cls_token_idx`` and count
    100 * w[cls_token_idx] (arc-state quirk; the id is replaced by the CLS token in the model).
    Counts are 100 * w of the gene in each slot.
    """

    def __init__(self, mapping: GeneMapping, *, pad_length: int, cls_token_idx: int) -> None:
        if mapping.n_mapped <= cls_token_idx:
            raise StateError(
                f"only {mapping.n_mapped} genes map to the vocabulary; the CLS slot needs more than {cls_token_idx}",
                hint="use an input with more vocabulary genes",
            )
        self.mapping = mapping
        self.pad_length = int(pad_length)
        self.cls_token_idx = int(cls_token_idx)
        valid = mapping.valid
        self._col_to_local = np.where(valid, np.cumsum(valid) - 1, -1).astype(np.int64)
        self._gid = mapping.filtered_global_ids
        self.nan_cells = 0

    def build(self, rows: sp.csr_matrix, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """rows [B, n_genes] CSR -> (ids int64 [B, pad_length], counts float32 [B, pad_length])."""
        rows = sp.csr_matrix(rows, dtype=np.float32, copy=True)
        rows.sum_duplicates()
        n_cells, slots = rows.shape[0], self.pad_length - 1
        gf = self._gid.shape[0]
        data = rows.data
        nan = np.isnan(data)
        if nan.any():
            self.nan_cells += int(np.unique(np.repeat(np.arange(n_cells), np.diff(rows.indptr))[nan]).size)
            data[nan] = 0.0
        np.maximum(data, 0.0, out=data)
        row_of = np.repeat(np.arange(n_cells), np.diff(rows.indptr))
        is_raw = self._raw_rows(data, row_of, n_cells)
        data = np.where(is_raw[row_of], np.log1p(data), data).astype(np.float32)

        local = self._col_to_local[rows.indices]
        keep = (local >= 0) & (data > 0)
        e_row, e_local, e_val = row_of[keep], local[keep], data[keep]
        totals = np.bincount(e_row, weights=e_val, minlength=n_cells).astype(np.float32)
        cls_val = np.zeros(n_cells, dtype=np.float32)
        at_cls = e_local == self.cls_token_idx
        cls_val[e_row[at_cls]] = e_val[at_cls]

        order = np.lexsort((rng.random(e_row.shape[0]), -e_val, e_row))
        e_row, e_local, e_val = e_row[order], e_local[order], e_val[order]
        n_expr = np.bincount(e_row, minlength=n_cells)
        starts = np.concatenate([[0], np.cumsum(n_expr)[:-1]])
        rank = np.arange(e_row.shape[0]) - starts[e_row]
        top = rank < slots

        slot_local = np.full((n_cells, slots), -1, dtype=np.int64)
        slot_val = np.zeros((n_cells, slots), dtype=np.float32)
        slot_local[e_row[top], rank[top]] = e_local[top]
        slot_val[e_row[top], rank[top]] = e_val[top]
        for cell in np.flatnonzero(n_expr < slots):
            expressed = np.sort(e_local[starts[cell] : starts[cell] + n_expr[cell]])
            slot_local[cell, n_expr[cell] :] = self._filler(expressed, gf, slots - n_expr[cell], rng)

        safe_totals = np.where(totals > 0, totals, 1.0).astype(np.float32)
        counts = np.empty((n_cells, self.pad_length), dtype=np.float32)
        counts[:, 1:] = 100.0 * (slot_val / safe_totals[:, None])
        counts[:, 0] = 100.0 * (cls_val / safe_totals)
        uniform = totals <= 0
        if uniform.any():
            counts[uniform] = np.float32(100.0 / gf)
        ids = np.empty((n_cells, self.pad_length), dtype=np.int64)
        ids[:, 0] = self._gid[self.cls_token_idx]
        ids[:, 1:] = self._gid[slot_local]
        return ids, counts

    @staticmethod
    def _raw_rows(data: np.ndarray, row_of: np.ndarray, n_cells: int) -> np.ndarray:
        row_max = np.zeros(n_cells, dtype=np.float64)
        if data.size:
            boundaries = np.flatnonzero(np.diff(row_of, prepend=-1))  # first entry of each non-empty row
            row_max[row_of[boundaries]] = np.maximum.reduceat(data, boundaries)
        with np.errstate(over="ignore"):  # huge raw counts overflow to inf, which still means "raw"
            expm1_sum = np.bincount(row_of, weights=np.expm1(data.astype(np.float64)), minlength=n_cells)
        return (row_max > RAW_MAX_THRESHOLD) | (expm1_sum > RAW_EXPM1_SUM_THRESHOLD)

    @staticmethod
    def _filler(expressed: np.ndarray, n_vocab: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """Zero-expression local genes for the slots left after the expressed ones."""
        n_zero = n_vocab - expressed.shape[0]
        if n_zero <= 0:  # every vocabulary gene is expressed: repeat genes (arc-state would fail here)
            return rng.integers(0, n_vocab, size=k)
        if n_vocab >= k + expressed.shape[0]:
            zero_rank = rng.choice(n_zero, size=k, replace=False)
        else:
            zero_rank = rng.integers(0, n_zero, size=k)
        # zero_rank j -> local index: j plus the number of expressed genes at or before that position
        before = expressed - np.arange(expressed.shape[0])
        return zero_rank + np.searchsorted(before, zero_rank, side="right")
