"""`state tx preprocess_train --write-layout`: the same layout `state tx index` writes, picked up by training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers.synthetic import make_perturbation_adata, write_toml
from state.__main__ import main
from state.tx.data import layout as layouts
from state.tx.data.loader import LayoutSetDataset
from state.tx.data.module import build_data_module, setup_data_module
from state.tx.data.selection import decide

KW = {"embed_key": "X_hvg", "output_space": "gene", "pert_col": "gene", "cell_type_key": "cell_type",
      "batch_col": "gem_group", "control_pert": "non-targeting", "num_workers": 0}


@pytest.fixture
def raw_path(tmp_path):
    raw = make_perturbation_adata(n_cells=300, n_genes=60, n_perts=5, n_celltypes=2, seed=4)
    raw.obsm["X_pca"] = np.random.default_rng(0).normal(size=(raw.n_obs, 7))  # float64: cast like h5 reads
    path = tmp_path / "raw.h5ad"
    raw.write_h5ad(path)
    return path


def _preprocess(raw_path, out, *extra: str) -> int:
    return main(["tx", "preprocess_train", "--adata", str(raw_path), "--output", str(out), "--num_hvgs", "20",
                 *extra])


def _assert_same_layout(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"X_hvg.f32", "X_pca.f32", "order.npy", "groups.npz", "batch.npy", "barcodes.npy", "meta.json"} <= set(names)
    for name in names:
        if name == "groups.npz":  # a zip: its member timestamps differ, its arrays must not
            with np.load(a / name) as x, np.load(b / name) as y:
                assert x.files == y.files
                for key in x.files:
                    np.testing.assert_array_equal(x[key], y[key])
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_write_layout_equals_tx_index_and_training_selects_it(tmp_path, raw_path, monkeypatch):
    out = tmp_path / "train.h5ad"
    monkeypatch.setattr(layouts, "_scatter_matrix", None)  # the rows must come from memory, not the new file
    assert _preprocess(raw_path, out, "--write-layout", "--layout-keys", "X_hvg,X_pca", "--layout-seed", "5") == 0
    monkeypatch.undo()
    written = out.with_name("train.h5ad.state_layout")
    kept = tmp_path / "from_preprocess"
    shutil.copytree(written, kept)

    toml = write_toml(tmp_path / "split.toml", dataset_name="d", data_path=out, kind="fewshot")
    assert main(["tx", "index", "--toml", str(toml), "--keys", "X_hvg,X_pca", "--seed", "5"]) == 0
    _assert_same_layout(kept, written)
    meta = json.loads((written / "meta.json").read_text())
    assert meta["n_cells"] == 300 and meta["matrices"] == {"X_hvg": 20, "X_pca": 7}

    kw = {**KW, "toml_config_path": str(toml), "fast_loader": "true"}
    assert decide(kw).use
    dm = build_data_module("PerturbationDataModule", kw, batch_size=2, cell_sentence_len=8)
    setup_data_module(dm)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(dm.train_dataloader().dataset, LayoutSetDataset)
    assert batch["pert_cell_emb"].shape == (16, 20)


def test_layout_dir_and_by_batch_reach_the_layout(tmp_path, raw_path):
    out = tmp_path / "train.h5ad"
    assert _preprocess(raw_path, out, "--write-layout", "--layout-dir", str(tmp_path / "lay"), "--by-batch") == 0
    assert not out.with_name("train.h5ad.state_layout").exists()
    lay = layouts.open_layout(out, tmp_path / "lay")
    assert lay.meta["group_by"] == ["cell_type", "pert", "batch"] and lay.meta["matrices"] == {"X_hvg": 20}
    assert layouts.layout_problem(out, tmp_path / "lay", keys=["X_hvg"],
                                  columns={"pert_col": "gene", "cell_type_key": "cell_type",
                                           "batch_col": "gem_group"}) is None


@pytest.mark.parametrize("extra, message", [
    (["--pert-col", "gene"], "--pert-col only applies to the training layout"),
    (["--layout-keys", "X_hvg"], "--layout-keys only applies"),
    (["--write-layout", "--batch-col", "plate"], "column 'plate' not found in adata.obs"),
    (["--write-layout", "--layout-keys", "X_hvg,X_umap"], "obsm['X_umap']"),
])
def test_bad_layout_options_fail_before_writing_anything(tmp_path, raw_path, capsys, fresh_logger, extra, message):
    out = tmp_path / "out" / "train.h5ad"
    assert _preprocess(raw_path, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
