"""Serve cell-load's obsm rows from memory.

cell-load reads cell embeddings (``obsm/X_hvg``, ``obsm/X_emb`` ...) from the h5 file with one h5py
call per run of consecutive rows; sets are shuffled, so that is nearly one call per cell, twice per
sample (perturbed cell and its control): for small models ~40% of a training step. A dense obsm
matrix is usually small (cells x a few hundred or thousand floats), so each dataset loads it once
and indexes rows in memory (a memory map of the file where the matrix is stored contiguous, so forked
workers share the page cache; otherwise read once before the workers fork). The values are the same
bytes, so results are unchanged. Matrices
above the budget (``STATE_OBSM_CACHE_MB``, default 2048 per file; 0 turns the cache off) and
CSR-stored obsm keep cell-load's own reads.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def cache_budget_bytes() -> int:
    return int(float(os.environ.get("STATE_OBSM_CACHE_MB", "2048")) * 2**20)


class ObsmCache:
    """Dense obsm matrices of one dataset, loaded when the dataset is made (before DataLoader workers fork;
    a pickled copy is rebuilt per process)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.matrices: dict[str, np.ndarray | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "matrices": {}}

    def matrix(self, key: str) -> np.ndarray | None:
        if key not in self.matrices:
            self.matrices[key] = self._load(key)
        return self.matrices[key]

    def _load(self, key: str) -> np.ndarray | None:
        """The matrix, memory-mapped from the h5 file where it is stored contiguous and uncompressed
        (anndata's default: every worker then shares the page cache), else read whole."""
        import h5py

        with h5py.File(self.dataset.h5_path, "r") as handle:  # our own handle: none is inherited by workers
            node = handle.get(f"obsm/{key}")
            if not isinstance(node, h5py.Dataset) or node.ndim != 2:
                return None
            size = int(np.prod(node.shape)) * 4
            if size > cache_budget_bytes():
                log.info("obsm['%s'] of %s (%d MiB) exceeds STATE_OBSM_CACHE_MB: read from the file", key,
                         self.dataset.h5_path, size >> 20)
                return None
            offset = node.id.get_offset()
            if offset is not None and node.chunks is None and node.dtype == np.dtype("<f4") and size > 0:
                return np.memmap(self.dataset.h5_path, dtype=np.float32, mode="r", offset=offset, shape=node.shape)
            return np.asarray(node[...], dtype=np.float32)

    def preload(self, keys: list[str]) -> None:
        """Load (or map) ``keys`` now, in the process that forks the DataLoader workers, so that N workers
        share one copy instead of each reading its own."""
        for key in keys:
            self.matrix(key)


class _CachedRow:
    """Stands in for ``dataset.fetch_obsm_expression(idx, key)``."""

    def __init__(self, cache: ObsmCache, original: Any) -> None:
        self.cache, self.original = cache, original

    def __call__(self, idx: int, key: str) -> torch.Tensor:
        matrix = self.cache.matrix(key)
        if matrix is None:
            return self.original(self.cache.dataset, idx, key)
        # A copied numpy row wrapped as a tensor: ~2.5x cheaper than indexing + clone() in torch.
        return torch.from_numpy(matrix[int(idx)].copy())


class _CachedRows(_CachedRow):
    """Stands in for ``dataset._fetch_obsm_expression_batch(indices, key)``."""

    def __call__(self, indices: np.ndarray, key: str) -> torch.Tensor:
        matrix = self.cache.matrix(key)
        if matrix is None:
            return self.original(self.cache.dataset, indices, key)
        return torch.from_numpy(matrix[np.asarray(indices, dtype=np.int64)])  # fancy indexing copies


def install(dataset: Any) -> Any:
    """Give one cell-load ``PerturbationDataset`` in-memory obsm rows (no-op when the budget is 0)."""
    if cache_budget_bytes() <= 0:
        return dataset
    cache = ObsmCache(dataset)
    cls = type(dataset)
    if hasattr(cls, "fetch_obsm_expression"):
        dataset.fetch_obsm_expression = _CachedRow(cache, cls.fetch_obsm_expression)
    if hasattr(cls, "_fetch_obsm_expression_batch"):
        dataset._fetch_obsm_expression_batch = _CachedRows(cache, cls._fetch_obsm_expression_batch)
    keys = [k for k in (getattr(dataset, "embed_key", None),) if k]
    if getattr(dataset, "output_space", None) == "gene" and (getattr(dataset, "store_raw_expression", False)
                                                              or getattr(dataset, "store_raw_basal", False)):
        keys.append("X_hvg")
    cache.preload(keys)
    return dataset
