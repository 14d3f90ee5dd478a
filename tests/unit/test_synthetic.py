"""The synthetic generator, the TOML writer and the bundled example all load with cell-load 0.10.4."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helpers.synthetic import make_perturbation_adata, make_processed_dataset, write_toml

REPO = Path(__file__).resolve().parents[2]


def test_generator_shape_types_and_determinism():
    a = make_perturbation_adata()
    assert a.shape == (400, 100)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X.data, np.round(a.X.data))  # integer counts
    assert a.X.data.min() > 0 and a.obs_names.is_unique and a.var_names.is_unique
    for col in ("gene", "cell_type", "gem_group"):
        assert isinstance(a.obs[col].dtype, pd.CategoricalDtype)
    assert set(a.obs["gene"].cat.categories) == {"non-targeting", *a.uns["synthetic"]["knocked_down_genes"]}
    assert a.obs["gene"].nunique() == 7 and a.obs["cell_type"].nunique() == 2 and a.obs["gem_group"].nunique() == 3
    np.testing.assert_array_equal(a.var["gene_name"], a.var_names)
    b = make_perturbation_adata()
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert not np.array_equal(a.X.toarray(), make_perturbation_adata(seed=1).X.toarray())
    dense = make_perturbation_adata(sparse=False)
    assert isinstance(dense.X, np.ndarray)
    np.testing.assert_array_equal(dense.X, a.X.toarray())


def test_generator_has_real_effects():
    a = make_perturbation_adata(n_cells=1200)
    X = a.X.toarray()
    control = (a.obs["gene"] == "non-targeting").to_numpy()
    for pert in a.uns["synthetic"]["knocked_down_genes"]:
        cells = (a.obs["gene"] == pert).to_numpy()
        target = a.var_names.get_loc(pert)
        assert X[cells, target].mean() < 0.5 * X[control, target].mean(), pert  # knockdown of its own target
        # ... and other genes move too (downstream effects), beyond sampling noise
        shift = np.abs(np.log1p(X[cells].mean(0)) - np.log1p(X[control].mean(0)))
        assert np.sort(shift)[-2] > 0.3, pert
    ct = a.obs["cell_type"].to_numpy()
    profile = [np.log1p(X[control & (ct == c)].mean(0)) for c in a.obs["cell_type"].cat.categories]
    assert np.abs(profile[0] - profile[1]).max() > 0.5  # cell-type-specific baselines


def test_processed_dataset_layout(tmp_path):
    path = make_processed_dataset(tmp_path, n_hvgs=30, embed_dim=8)
    a = ad.read_h5ad(path)
    assert sp.isspmatrix_csr(a.X) and a.obsm["X_hvg"].dtype == np.float32 and a.obsm["X_emb"].shape == (400, 8)
    np.testing.assert_array_equal(a.obsm["X_hvg"], a.X.toarray()[:, a.var["highly_variable"].to_numpy()])
    assert {"highly_variable", "means", "dispersions", "dispersions_norm"} <= set(a.var.columns)
    assert {"log1p", "hvg"} <= set(a.uns)


def _datamodule(toml, **overrides):
    from cell_load.data_modules import PerturbationDataModule

    kwargs = dict(
        toml_config_path=str(toml), pert_col="gene", cell_type_key="cell_type", batch_col="gem_group",
        control_pert="non-targeting", embed_key="X_hvg", output_space="gene", num_workers=0,
        batch_size=2, cell_sentence_len=8,
    )
    dm = PerturbationDataModule(**{**kwargs, **overrides})
    dm.setup()
    return dm


@pytest.mark.parametrize("kind", ["zeroshot", "fewshot", "mixed"])
def test_toml_kinds_load_with_cell_load(tmp_path, kind):
    data = make_processed_dataset(tmp_path / "data", n_hvgs=20, n_celltypes=3)
    toml = write_toml(tmp_path / f"{kind}.toml", dataset_name="synth", data_path=data.parent, kind=kind)
    n_hvg = ad.read_h5ad(data, backed="r").obsm["X_hvg"].shape[1]  # >= 20: ties may add genes
    dm = _datamodule(toml)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pert_cell_emb"].shape == (16, n_hvg) and batch["ctrl_cell_emb"].shape == (16, n_hvg)
    assert batch["pert_emb"].shape == (16, 7) and batch["batch"].shape == (16, 3)
    test_types = {ct for b in dm.test_dataloader() for ct in b["cell_type"]}
    assert test_types == ({"K562", "HepG2"} if kind == "mixed" else {"K562"})
    if kind == "fewshot":
        test_perts = {p for b in dm.test_dataloader() for p in b["pert_name"]}
        assert test_perts == {"non-targeting", *toml.read_text().split("test = [")[1].split("]")[0]
                              .replace('"', "").split(", ")}


def test_examples_load_from_repo_root(monkeypatch):
    example = REPO / "examples" / "data" / "example.h5ad"
    if not example.exists():
        pytest.skip("examples/data/example.h5ad not generated (python examples/make_example.py)")
    assert example.stat().st_size < 3e6
    monkeypatch.chdir(REPO)  # the TOMLs hold paths relative to the repository root
    for kind in ("zeroshot", "fewshot", "mixed"):
        toml = REPO / "examples" / f"{kind}.toml"
        assert "examples/data/example.h5ad" in toml.read_text()
        dm = _datamodule(toml, embed_key="X_emb")  # decoder targets come from X_hvg
        batch = next(iter(dm.train_dataloader()))
        assert batch["pert_cell_emb"].shape[1] == 16 and batch["pert_cell_counts"].shape[1] == 64
        assert len(dm.test_datasets) >= 1


def test_effects_generator_records_context_specific_truth_with_null_and_off_panel_perturbations():
    from state.datasets.synthetic_effects import make_effects_adata, truth_table

    adata = make_effects_adata(n_contexts=3, n_perts=20, n_genes=60, cells_per_group=4, control_cells=10, seed=3)
    again = make_effects_adata(n_contexts=3, n_perts=20, n_genes=60, cells_per_group=4, control_cells=10, seed=3)
    assert (adata.X != again.X).nnz == 0  # one seed, one data set
    truth = truth_table(adata)
    assert truth.shape == (3 * 20, 60)
    perts = sorted(set(truth.index.get_level_values(1)))
    off_panel = [p for p in perts if p.startswith("OFF")]
    assert len(off_panel) == 2 and not set(off_panel) & set(adata.var_names)
    moved = {p: (truth.xs(p, level=1).abs() > 0).sum(axis=1) for p in perts}
    null = [p for p in perts if p not in off_panel and moved[p].max() == 1]  # knockdown of its target only
    assert len(null) == 2
    # contexts respond differently to the same perturbation (gains and context programs)
    active = next(p for p in perts if moved[p].max() > 3)
    by_context = truth.xs(active, level=1).to_numpy()
    assert not np.allclose(by_context[0], by_context[1])
    assert np.corrcoef(by_context[0], by_context[1])[0, 1] > 0.3  # ... but share the perturbation's programs
