"""A run with ``pert_combination=additive`` infers a combination it never saw from its parts, and
refuses one with a part it never saw, naming the part."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from state.__main__ import main
from state.datasets.synthetic_combinations import make_combination_adata
from state.tx.checkpoint import read_checkpoint
from state.tx.preprocess import normalize_log1p_hvg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("combos")
    adata = make_combination_adata(n_singles=6, n_doubles=5, n_genes=30, n_programs=3, cells_per_pert=6,
                                   control_cells=40, seed=0)
    del adata.uns["true_effects"], adata.uns["combination_kinds"]
    normalize_log1p_hvg(adata, num_hvgs=20)
    adata.write_h5ad(work / "screen.h5ad")
    doubles = [x for x in adata.obs["gene"].cat.categories if "ctrl" not in x]
    (work / "split.toml").write_text(
        f'[datasets]\nscreen = "{work / "screen.h5ad"}"\n[training]\nscreen = "train"\n'
        f'[fewshot."screen.K562"]\nval = []\ntest = ["{doubles[0]}"]\n')
    assert main(["tx", "train", f"data.kwargs.toml_config_path={work / 'split.toml'}", "data.kwargs.embed_key=X_hvg",
                 "data.kwargs.output_space=gene", "data.kwargs.num_workers=0", "data.kwargs.control_pert=ctrl",
                 "data.kwargs.pert_col=gene", "data.kwargs.batch_col=gem_group", "model=perturb_mean",
                 "model.kwargs.cell_set_len=8", "+model.kwargs.pert_combination=additive", "training.max_steps=1",
                 "training.batch_size=2", "use_wandb=false", f"output_dir={work}", "name=run"]) == 0
    return work, adata


def _infer(work, adata, label, tmp_path, *extra):
    controls = adata[adata.obs["gene"] == "ctrl"].copy()
    asked = controls[:5].copy()
    asked.obs["gene"] = label
    query = ad.concat([controls, asked])
    query.obs_names_make_unique()
    query.write_h5ad(tmp_path / "query.h5ad")
    code = main(["tx", "infer", "--model-dir", str(work / "run"), "--adata", str(tmp_path / "query.h5ad"),
                 "--pert-col", "gene", "--embed-key", "X_hvg", "--output", str(tmp_path / "out.h5ad"), "--quiet",
                 *extra])
    return code, controls


def test_unseen_combination_is_the_sum_of_its_parts(run, tmp_path):
    work, adata = run
    labels = set(adata.obs["gene"].astype(str))
    singles = sorted(x.split("+")[0] for x in labels if x.endswith("+ctrl"))
    unseen = next(f"{a}+{b}" for a in singles for b in singles
                  if a < b and f"{a}+{b}" not in labels and f"{b}+{a}" not in labels)
    code, controls = _infer(work, adata, unseen, tmp_path)
    assert code == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    offsets = read_checkpoint(work / "run" / "checkpoints" / "final.ckpt")["pert_mean_offsets"]
    a, b = unseen.split("+")
    shift = np.asarray(offsets[f"{a}+ctrl"]) + np.asarray(offsets[f"{b}+ctrl"])
    assert np.abs(shift).max() > 0.05  # a real shift, so the check below can fail
    simulated = out.obsm["X_hvg"][(out.obs["gene"] == unseen).to_numpy()]
    # each simulated cell = a control cell the simulation started from + the two parts' shifts
    # (infer clips expression predictions at 0, as arc-state does)
    expected = np.clip(np.asarray(controls.obsm["X_hvg"]) + shift, 0.0, None)  # [controls, genes]
    distance = np.abs(simulated[:, None, :] - expected[None, :, :]).max(axis=2).min(axis=1)
    assert distance.max() < 1e-4
    one_part = np.clip(np.asarray(controls.obsm["X_hvg"]) + np.asarray(offsets[f"{a}+ctrl"]), 0.0, None)
    assert np.abs(simulated[:, None, :] - one_part[None, :, :]).max(axis=2).min(axis=1).max() > 1e-2


def test_unknown_part_is_refused_by_name(run, tmp_path, capsys):
    work, adata = run
    code, _ = _infer(work, adata, "P000+NOPE9", tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    assert "NOPE9" in err and "unknown to the model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.h5ad").exists()
