"""Synthetic perturbation data for tests.

The generator lives in :mod:`state.datasets.synthetic` (so ``examples/make_example.py`` and the
benchmarks use the very same code); this module is the import point for tests::

    from helpers.synthetic import make_perturbation_adata, make_processed_dataset, write_toml

* ``make_perturbation_adata(n_cells=400, n_genes=100, n_perts=6, n_celltypes=2, n_batches=3, ...)``:
  raw negative-binomial counts (float32 CSR), knockdown + downstream effects, cell-type and batch
  effects; categorical obs ``gene`` / ``cell_type`` / ``gem_group``; control ``non-targeting``.
* ``make_processed_adata(n_hvgs=50, embed_dim=None, **kw)``: the same, processed like
  ``state tx preprocess_train`` (log1p X, ``obsm['X_hvg']``, optional ``obsm['X_emb']``).
* ``make_processed_dataset(dir, n_hvgs=50, embed_dim=None, filename="synthetic.h5ad", **kw) -> Path``.
* ``write_toml(path, dataset_name=..., data_path=..., kind="zeroshot"|"fewshot"|"mixed", ...) -> Path``:
  a cell-load split file; held-out cell types / perturbations are read from the data file unless given.
"""

from __future__ import annotations

from state.datasets.synthetic import (
    CELLTYPE_NAMES,
    CONTROL_LABEL,
    add_embedding,
    celltype_names,
    default_splits,
    gene_symbols,
    make_perturbation_adata,
    make_processed_adata,
    make_processed_dataset,
    write_toml,
)

__all__ = [
    "CELLTYPE_NAMES",
    "CONTROL_LABEL",
    "add_embedding",
    "celltype_names",
    "default_splits",
    "gene_symbols",
    "make_perturbation_adata",
    "make_processed_adata",
    "make_processed_dataset",
    "write_toml",
]
