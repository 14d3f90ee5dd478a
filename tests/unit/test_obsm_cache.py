"""The in-memory obsm cache returns exactly what cell-load reads from the file."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import torch

from helpers.synthetic import make_processed_dataset, write_toml
from state.tx.data import obsm_cache
from state.tx.data.module import state_data_module_class


def _dataset(tmp_path, monkeypatch, budget_mb: str):
    monkeypatch.setenv("STATE_OBSM_CACHE_MB", budget_mb)
    data = make_processed_dataset(tmp_path, n_cells=200, n_genes=40, n_hvgs=16, n_perts=4, seed=2)
    toml = write_toml(tmp_path / "split.toml", dataset_name="d", data_path=data, kind="zeroshot")
    dm = state_data_module_class()(toml_config_path=str(toml), embed_key="X_hvg", output_space="gene",
                                   control_pert="non-targeting", num_workers=0, cell_sentence_len=8,
                                   batch_size=2)
    dm.setup()
    return dm.train_datasets[0].dataset


def test_cached_rows_equal_file_rows(tmp_path, monkeypatch):
    ds = _dataset(tmp_path, monkeypatch, "64")
    assert isinstance(ds._fetch_obsm_expression_batch, obsm_cache._CachedRows)
    rows = np.array([5, 3, 3, 120, 0])
    cached = ds._fetch_obsm_expression_batch(rows, "X_hvg")
    from_file = type(ds)._fetch_obsm_expression_batch(ds, rows, "X_hvg")
    assert torch.equal(cached, from_file)
    assert torch.equal(ds.fetch_obsm_expression(7, "X_hvg"), type(ds).fetch_obsm_expression(ds, 7, "X_hvg"))
    clone = pickle.loads(pickle.dumps(ds._fetch_obsm_expression_batch.cache))
    assert clone.matrices == {}  # worker processes rebuild their own copy


def test_budget_zero_keeps_cell_load_reads(tmp_path, monkeypatch):
    ds = _dataset(tmp_path, monkeypatch, "0")
    assert "_fetch_obsm_expression_batch" not in vars(ds)


def test_matrix_is_ready_before_workers_fork_and_mapped_when_contiguous(tmp_path, monkeypatch):
    import anndata as ad

    ds = _dataset(tmp_path, monkeypatch, "64")
    held = ds._fetch_obsm_expression_batch.cache.matrices
    assert isinstance(held.get("X_hvg"), np.memmap)  # loaded at setup, in the process that forks the workers
    packed = tmp_path / "packed.h5ad"
    ad.read_h5ad(ds.h5_path).write_h5ad(packed, compression="gzip")  # chunked: not mapped, read whole instead
    cache = obsm_cache.ObsmCache(SimpleNamespace(h5_path=packed))
    cache.preload(["X_hvg"])
    assert type(cache.matrices["X_hvg"]) is np.ndarray
    np.testing.assert_array_equal(cache.matrices["X_hvg"], held["X_hvg"])
