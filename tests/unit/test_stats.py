"""`state tx stats`: numbers against plain numpy/pandas, sparse-awareness, files, one-line errors."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helpers.synthetic import make_processed_adata
from state.__main__ import main
from state.tx import stats
from state.utils.errors import StateError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUTPUTS = ("gene_stats.csv", "cells_per_perturbation.csv", "perturbation_summary.csv", "perturbation_deltas.csv",
           "top_genes.csv", "cells_per_perturbation.png", "top_delta_heatmap.png", "gene_mean_vs_nonzero.png")


@pytest.fixture(scope="module")
def adata():
    return make_processed_adata(n_cells=360, n_genes=40, n_perts=5, n_celltypes=2, n_hvgs=12, seed=2)


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


@pytest.mark.parametrize("sparse", [True, False])
def test_column_stats_match_numpy_across_row_blocks(monkeypatch, sparse):
    monkeypatch.setattr(stats, "ROW_BLOCK", 7)  # many blocks, a ragged last one
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(50, 6)) * (rng.random((50, 6)) < 0.4)
    dense[:, 2] = -np.abs(dense[:, 2])  # all stored values negative: max is an implicit 0
    dense[:, 5] = 0.0
    matrix = sp.csr_matrix(dense) if sparse else dense
    if sparse:  # an explicitly stored zero is not "non-zero"
        matrix = matrix.tolil()
        matrix[0, 5] = 0.0
        matrix = sp.csr_matrix(matrix)
    table = stats.column_stats(matrix)
    np.testing.assert_allclose(table["mean"], dense.mean(axis=0))
    np.testing.assert_allclose(table["max"], dense.max(axis=0))
    np.testing.assert_allclose(table["nonzero_fraction"], (dense != 0).mean(axis=0))


def test_group_means_match_pandas():
    rng = np.random.default_rng(1)
    dense = rng.poisson(1.0, size=(30, 5)).astype(np.float32)
    codes = rng.integers(-1, 4, size=30)  # -1 rows are ignored
    means = stats.group_means(sp.csr_matrix(dense), codes, 4)
    expected = pd.DataFrame(dense[codes >= 0]).groupby(codes[codes >= 0]).mean().to_numpy()
    np.testing.assert_allclose(means, expected, rtol=1e-6)


def test_deltas_top_genes_and_knockdown_targets(adata):
    result = stats.perturbation_stats(adata, pert_col="gene", control_pert="non-targeting", top_n=4)
    X = _dense(adata.X)
    labels = adata.obs["gene"].astype(str).to_numpy()
    control = X[labels == "non-targeting"].mean(axis=0)
    for pert in result.deltas.index:
        np.testing.assert_allclose(result.deltas.loc[pert].to_numpy(), X[labels == pert].mean(axis=0) - control,
                                   atol=1e-5)
    # every synthetic perturbation knocks down its own target: it must show up as a strong negative change
    assert (result.summary["target_gene_delta"] < 0).all()
    assert (result.summary["target_gene_rank"] <= 3).all()
    assert set(result.summary.index) == set(adata.uns["synthetic"]["knocked_down_genes"])
    top = result.top_genes
    assert list(top.columns) == ["perturbation", "rank", "gene", "delta", "control_mean", "perturbed_mean"]
    first = top[top["perturbation"] == result.summary.index[0]]
    assert list(first["rank"]) == [1, 2, 3, 4] and np.all(np.diff(np.abs(first["delta"].to_numpy())) <= 0)
    np.testing.assert_allclose(first["perturbed_mean"] - first["control_mean"], first["delta"], atol=1e-6)
    counts = result.cell_counts
    assert counts["n_cells"].sum() == adata.n_obs and bool(counts.loc["non-targeting", "is_control"])
    np.testing.assert_allclose(result.gene_stats["mean"], X.mean(axis=0), rtol=1e-5)


def test_cell_types_get_their_own_controls(adata, state_log):
    result = stats.perturbation_stats(adata, pert_col="gene", control_pert="non-targeting", celltype_col="cell_type")
    X = _dense(adata.X)
    labels = adata.obs["gene"].astype(str).to_numpy()
    types = adata.obs["cell_type"].astype(str).to_numpy()
    ct, pert = result.deltas.index[0]
    expected = X[(types == ct) & (labels == pert)].mean(0) - X[(types == ct) & (labels == "non-targeting")].mean(0)
    np.testing.assert_allclose(result.deltas.loc[(ct, pert)].to_numpy(), expected, atol=1e-5)
    assert set(result.cell_counts.columns) == {"n_cells", "is_control", *set(types)}

    # a cell type without controls is reported and left out, not compared with another type's controls
    lonely = adata[~((types == ct) & (labels == "non-targeting"))].copy()
    with state_log.at_level(logging.WARNING, logger="state.tx.stats"):
        partial = stats.perturbation_stats(lonely, pert_col="gene", control_pert="non-targeting",
                                           celltype_col="cell_type")
    assert ct not in set(partial.deltas.index.get_level_values("cell_type")) and ct in state_log.text


def test_sparse_x_is_never_densified(adata, monkeypatch):
    n_obs = adata.n_obs
    original = sp.csr_matrix.toarray

    def guarded(self, *args, **kwargs):
        assert self.shape[0] < n_obs, "the whole matrix was densified"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", guarded)
    monkeypatch.setattr(sp.csr_matrix, "todense", lambda self, *a, **k: pytest.fail("todense called"))
    monkeypatch.setattr(stats, "ROW_BLOCK", 64)
    result = stats.perturbation_stats(adata, pert_col="gene", control_pert="non-targeting", celltype_col="cell_type")
    assert len(result.deltas) == 10


def test_cli_writes_tables_and_figures(adata, tmp_path):
    source = tmp_path / "screen.h5ad"
    adata.write_h5ad(source)
    out = tmp_path / "stats"
    assert main(["tx", "stats", "--adata", str(source), "--output-dir", str(out), "--pert-col", "gene",
                 "--control-pert", "non-targeting", "--celltype-col", "cell_type", "--top-n", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporary files left
    for name in OUTPUTS:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC and (out / name).stat().st_size > 5000
    top = pd.read_csv(out / "top_genes.csv")
    assert len(top) == 10 * 3 and list(top.columns[:2]) == ["cell_type", "perturbation"]
    deltas = pd.read_csv(out / "perturbation_deltas.csv")
    assert deltas.shape == (10, 2 + adata.n_vars)
    genes = pd.read_csv(out / "gene_stats.csv", index_col=0)
    assert list(genes.columns) == ["mean", "max", "nonzero_fraction", "control_mean"]


def test_many_perturbations_and_dense_x_plot(tmp_path):
    many = make_processed_adata(n_cells=500, n_genes=120, n_perts=80, n_celltypes=1, n_hvgs=20, seed=0)
    many.X = many.X.toarray()
    result = stats.perturbation_stats(many, pert_col="gene", control_pert="non-targeting")
    files = stats.write_stats(result, tmp_path)
    assert len(files) == len(OUTPUTS) and len(result.cell_counts) == 81


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pert-col", "perturbation"], "column 'perturbation' not found in adata.obs"),
        (["--control-pert", "DMSO"], "label 'DMSO' not found in adata.obs['gene']"),
        (["--celltype-col", "celltype"], "column 'celltype' not found"),
        (["--top-n", "0"], "--top-n must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(adata, tmp_path, capsys, extra, message):
    source = tmp_path / "screen.h5ad"
    adata.write_h5ad(source)
    out = tmp_path / "stats"
    assert main(["tx", "stats", "--adata", str(source), "--output-dir", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_missing_file_and_output_that_is_a_file(tmp_path, capsys):
    assert main(["tx", "stats", "--adata", str(tmp_path / "nope.h5ad"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "nope.h5ad does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ad.AnnData(np.ones((2, 2), dtype=np.float32)).write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(StateError, match="is a file"):
        stats.run_stats(tmp_path / "a.h5ad", blocker, pert_col="gene", control_pert="c")
