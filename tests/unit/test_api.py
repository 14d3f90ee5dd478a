"""`state.api` and `state.heads`: docstring examples, the same numbers as the CLI, errors, heads."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.synthetic import make_perturbation_adata
from state import api, heads
from state.__main__ import main
from state.tx.config.compose import compose_tx_config
from state.utils.errors import StateError

FIX = Path(__file__).resolve().parents[1] / "data" / "fixtures"
LLAMA = FIX / "tx" / "state_llama"
SE_MODEL = FIX / "emb" / "se_tiny" / "model"
SE_INPUT = FIX / "emb" / "se_tiny" / "input.h5ad"


@pytest.mark.parametrize("module", [api, heads], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    assert api.fit_head is heads.fit_head and api.Head is heads.Head
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 2 and result.failed == 0


def test_import_state_is_light_and_api_is_lazy():
    code = ("import sys, state; assert 'state.api' not in sys.modules; from state import api; "
            "assert state.api is api and callable(api.train); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- preprocess / train
def test_preprocess_equals_the_command(tmp_path):
    raw = make_perturbation_adata(n_cells=80, n_genes=30, n_perts=3, seed=4)
    raw.write_h5ad(tmp_path / "raw.h5ad")
    assert main(["tx", "preprocess_train", "--adata", str(tmp_path / "raw.h5ad"), "--output",
                 str(tmp_path / "cli.h5ad"), "--num_hvgs", "10"]) == 0
    cli = ad.read_h5ad(tmp_path / "cli.h5ad")
    returned = api.preprocess(raw, num_hvgs=10)
    assert returned is raw  # in place by default
    np.testing.assert_array_equal(raw.obsm["X_hvg"], cli.obsm["X_hvg"])
    np.testing.assert_array_equal(raw.X.toarray(), cli.X.toarray())
    assert raw.var["highly_variable"].equals(cli.var["highly_variable"])
    with pytest.raises(StateError, match="already log-transformed"):
        api.preprocess(raw, num_hvgs=10)


def test_override_dicts_round_trip_through_hydra():
    strings = api.override_strings({
        "model": "state_tiny", "name": "it's a:b,c", "training.lr": 1e-4, "training.max_steps": 7,
        "model.kwargs.decoder_hidden_dims": [8, 4], "data.kwargs.embed_key": None, "use_wandb": False,
        "output_dir": Path("/tmp/some dir"),
    })  # fmt: skip
    cfg = compose_tx_config(strings)
    assert cfg.model.kwargs.hidden_dim == 32  # the state_tiny group was selected
    assert cfg.name == "it's a:b,c" and cfg.training.lr == 1e-4 and cfg.training.max_steps == 7
    assert list(cfg.model.kwargs.decoder_hidden_dims) == [8, 4] and cfg.data.kwargs.embed_key is None
    assert cfg.use_wandb is False and cfg.output_dir == "/tmp/some dir"
    assert api.override_strings(["a=1", "+b=2"]) == ["a=1", "+b=2"]
    with pytest.raises(StateError, match="not one string"):
        api.override_strings("training.max_steps=3")


def test_train_rejects_bad_config_before_writing(tmp_path):
    with pytest.raises(StateError, match="model.kwargs.hiden_dim"):
        api.train(overrides={"model.kwargs.hiden_dim": 3, "output_dir": str(tmp_path)})
    with pytest.raises(StateError, match="toml_config_path"):
        api.train(overrides={"output_dir": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


def test_full_config_from_a_run_with_overrides():
    cfg = api._load_full_config(LLAMA / "run" / "config.yaml", ["name=again", "+training.extra=1"])
    assert cfg.name == "again" and cfg.training.extra == 1 and cfg.model.name == "state"
    with pytest.raises(StateError, match="unknown config key 'training.nope'"):
        api._load_full_config(LLAMA / "run" / "config.yaml", ["training.nope=1"])
    with pytest.raises(StateError, match="not found"):
        api.train(LLAMA / "run" / "missing.yaml")


# ---------------------------------------------------------------------------------------------- load_run / predict
@pytest.fixture(scope="module")
def llama_run():
    return api.load_run(LLAMA / "run")


def test_run_predict_reproduces_arc_state_infer(llama_run):
    cells = ad.read_h5ad(LLAMA / "infer_input.h5ad")
    before = cells.obsm["X_hvg"].copy()
    with pytest.raises(StateError, match="TXG_UNSEEN"):  # unknown perturbations are refused by default
        llama_run.predict(cells, pert_col="gene", seed=42)
    # embed key: the model's own (X_hvg); arc-state treats unknown labels as controls
    out = llama_run.predict(cells, pert_col="gene", seed=42, unknown_as_control=True)
    expected = ad.read_h5ad(LLAMA / "infer_expected.h5ad")
    np.testing.assert_allclose(out.obsm["X_hvg"], expected.obsm["X_hvg"], atol=1e-5, rtol=1e-5)
    assert out.obs.equals(expected.obs)
    np.testing.assert_array_equal(cells.obsm["X_hvg"], before)  # the input is untouched
    assert llama_run.embed_key == "X_hvg" and llama_run.control_pert == "non-targeting"
    assert llama_run.checkpoint.name == "final.ckpt" and "TXG0023" in llama_run.perturbations


def test_run_predict_with_perturbations_equals_infer_tsv(llama_run, tmp_path):
    cells = ad.read_h5ad(LLAMA / "infer_input.h5ad")
    controls = cells[cells.obs["gene"] == "non-targeting"].copy()
    controls.write_h5ad(tmp_path / "controls.h5ad")
    (tmp_path / "req.tsv").write_text("perturbation\tnum_cells\nTXG0057\t20\nTXG0062\t7\n")
    assert main(["tx", "infer", "--model-dir", str(LLAMA / "run"), "--adata", str(tmp_path / "controls.h5ad"),
                 "--pert-col", "gene", "--embed-key", "X_hvg", "--tsv", str(tmp_path / "req.tsv"), "--seed", "3",
                 "--output", str(tmp_path / "cli.h5ad"), "--quiet"]) == 0
    cli = ad.read_h5ad(tmp_path / "cli.h5ad")
    out = llama_run.predict(controls, perturbations={"TXG0057": 20, "TXG0062": 7}, pert_col="gene", seed=3)
    np.testing.assert_array_equal(out.obsm["X_hvg"], cli.obsm["X_hvg"])
    assert list(out.obs["gene"].astype(str)) == list(cli.obs["gene"].astype(str))
    # a list of names: as many clones as control cells, per name
    listed = llama_run.predict(controls, perturbations=["TXG0057"], pert_col="gene", n_cells=5)
    assert (listed.obs["gene"] == "TXG0057").sum() == 5 and listed.n_obs == controls.n_obs + 5


def test_load_run_checkpoint_names_and_errors(llama_run, tmp_path):
    same = api.load_run(LLAMA / "run", checkpoint="final")
    assert same.checkpoint == LLAMA / "run" / "checkpoints" / "final.ckpt"
    with pytest.raises(StateError, match=r"checkpoint not found: .*best.ckpt \(available: final.ckpt\)"):
        api.load_run(LLAMA / "run", checkpoint="best")
    cells = ad.read_h5ad(LLAMA / "infer_input.h5ad")
    with pytest.raises(StateError, match="pert_col 'perturbation' is not an obs column"):
        llama_run.predict(cells, pert_col="perturbation")
    with pytest.raises(StateError, match="control label 'DMSO' not found"):
        llama_run.predict(cells, pert_col="gene", control_pert="DMSO")
    with pytest.raises(StateError, match="256 columns but the model expects 64"):
        llama_run.predict(cells, pert_col="gene", embed_key="X", unknown_as_control=True)
    with pytest.raises(StateError, match="negative cell counts"):
        llama_run.predict(cells, pert_col="gene", perturbations={"TXG0057": -1})


# ---------------------------------------------------------------------------------------------- embed / vector store
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The se_tiny fixture input embedded by the command line (seeded) and by the API."""
    folder = tmp_path_factory.mktemp("emb")
    assert main(["emb", "transform", "--model-folder", str(SE_MODEL), "--input", str(SE_INPUT), "--output",
                 str(folder / "cli.h5ad"), "--lancedb", str(folder / "cli_db"), "--seed", "5"]) == 0
    cells = ad.read_h5ad(SE_INPUT)
    returned = api.embed(cells, model_folder=SE_MODEL, key_added="X_se", seed=5)
    return folder, cells, returned


def test_embed_equals_transform(embedded):
    folder, cells, returned = embedded
    cli = ad.read_h5ad(folder / "cli.h5ad")
    np.testing.assert_array_equal(cells.obsm["X_se"], cli.obsm["X_state"])
    assert returned is cells.obsm["X_se"] or np.array_equal(returned, cells.obsm["X_se"])
    with pytest.raises(StateError, match="model_folder= or checkpoint="):
        api.embed(cells)


def test_vector_store_matches_the_command_line(embedded, tmp_path):
    folder, cells, _ = embedded
    query = cells[:6].copy()
    query.obsm["X_state"] = query.obsm["X_se"]
    query.write_h5ad(tmp_path / "query.h5ad")
    assert main(["emb", "query", "--lancedb", str(folder / "cli_db"), "--input", str(tmp_path / "query.h5ad"),
                 "--output", str(tmp_path / "hits.csv"), "--k", "4", "--batch-size", "4"]) == 0
    cli_hits = pd.read_csv(tmp_path / "hits.csv")

    assert api.build_vector_store(cells, tmp_path / "db", embed_key="X_se", dataset="input") == cells.n_obs
    hits = api.query_vector_store(tmp_path / "db", query, k=4, embed_key="X_se", batch_size=4)
    assert list(hits.columns) == list(cli_hits.columns)
    for column in ("cell_id", "query_cell_id", "query_rank", "dataset", "cell_type"):
        assert hits[column].astype(str).tolist() == cli_hits[column].astype(str).tolist(), column
    np.testing.assert_allclose(hits["query_distance"], cli_hits["query_distance"], rtol=1e-5, atol=1e-6)
    assert hits.groupby("query_cell_id")["query_rank"].first().eq(1).all()
    assert (hits.loc[hits["query_rank"] == 1, "cell_id"] == hits.loc[hits["query_rank"] == 1, "query_cell_id"]).all()

    typed = api.query_vector_store(tmp_path / "db", query, k=2, embed_key="X_se", filter="cell_type = 'typeX'")
    assert set(typed["cell_type"]) == {"typeX"} and len(typed) == 12
    with pytest.raises(StateError, match="obsm\\['X_nope'\\] not found"):
        api.query_vector_store(tmp_path / "db", query, embed_key="X_nope")
    short = query.copy()
    short.obsm["X_se"] = short.obsm["X_se"][:, :5]
    with pytest.raises(StateError, match="width 5"):
        api.query_vector_store(tmp_path / "db", short, embed_key="X_se")


# ---------------------------------------------------------------------------------------------- heads
def _cells(n=240, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    labels = rng.choice(["a", "b", "c"], size=n)
    centers = {"a": [2, 0, 0, 0], "b": [0, 2, 0, 0], "c": [0, 0, 2, 0]}
    x = np.stack([centers[v] for v in labels]) + rng.normal(scale=0.6, size=(n, 4))
    obs = pd.DataFrame({"label": pd.Categorical(labels), "score": x[:, 0] - x[:, 1]},
                       index=[f"c{i}" for i in range(n)])
    cells = ad.AnnData(obs=obs)
    cells.obsm["emb"] = x.astype(np.float32)
    return cells


def test_heads_are_deterministic_and_learn(tmp_path):
    cells = _cells()
    first = heads.fit_head(cells, embed_key="emb", target="label", epochs=15, seed=3)
    again = heads.fit_head(cells, embed_key="emb", target="label", epochs=15, seed=3)
    other = heads.fit_head(cells, embed_key="emb", target="label", epochs=15, seed=4)
    for name, tensor in first.module.state_dict().items():
        assert torch.equal(tensor, again.module.state_dict()[name]), name
    assert any(not torch.equal(t, other.module.state_dict()[n]) for n, t in first.module.state_dict().items())
    assert first.classes == ["a", "b", "c"] and first.losses[-1] < first.losses[0]
    assert (first.predict(cells) == cells.obs["label"].astype(str).to_numpy()).mean() > 0.9
    proba = first.predict_proba(cells)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    state_before = torch.random.get_rng_state()
    heads.fit_head(cells, embed_key="emb", target="label", epochs=1, seed=9)
    assert torch.equal(state_before, torch.random.get_rng_state())  # the global RNG is left alone


def test_regression_head_and_missing_targets():
    cells = _cells(seed=1)
    cells.obs.loc[cells.obs_names[:10], "score"] = np.nan
    head = heads.fit_head(cells, embed_key="emb", target="score", task="regression", hidden=(16, 16), epochs=40)
    pred = head.predict(cells)
    keep = cells.obs["score"].notna().to_numpy()
    assert pred.dtype == np.float32 and np.corrcoef(pred[keep], cells.obs["score"][keep])[0, 1] > 0.95
    with pytest.raises(StateError, match="only defined for classification"):
        head.predict_proba(cells)


def test_head_save_load_round_trip(tmp_path):
    cells = _cells()
    head = heads.fit_head(cells, embed_key="emb", target="label", hidden=(8,), epochs=3, dropout=0.1)
    folder = head.save(tmp_path / "head")
    assert sorted(p.name for p in folder.iterdir()) == ["head.json", "head.pt"]
    meta = json.loads((folder / "head.json").read_text())
    assert meta["format"] == "state.head" and meta["classes"] == ["a", "b", "c"] and meta["embed_key"] == "emb"
    loaded = heads.Head.load(folder)
    np.testing.assert_array_equal(loaded.predict_proba(cells), head.predict_proba(cells))
    assert api.load_head(folder).hidden == (8,)


def test_head_files_are_loaded_safely(tmp_path):
    head = heads.fit_head(_cells(), embed_key="emb", target="label", epochs=1)
    folder = head.save(tmp_path / "head")

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"layers.0.weight": Evil()}, folder / "head.pt")
    with pytest.raises(StateError):
        heads.Head.load(folder)
    assert not (tmp_path / "pwned").exists()
    (folder / "head.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(StateError, match="is not a state head"):
        heads.Head.load(folder)
    with pytest.raises(StateError, match="head.json not found"):
        heads.Head.load(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_key": "X_nope", "target": "label"}, "obsm['X_nope'] not found"),
        ({"embed_key": "emb", "target": "nope"}, "target 'nope' is not an obs column"),
        ({"embed_key": "emb", "target": "label", "task": "ranking"}, "task must be one of"),
        ({"embed_key": "emb", "target": "label", "task": "regression"}, "is not numeric"),
        ({"embed_key": "emb", "target": "same"}, "classification needs 2 or more"),
    ],
)
def test_head_errors_name_the_problem(kwargs, message):
    cells = _cells(n=20)
    cells.obs["same"] = "x"
    with pytest.raises(StateError, match=message.replace("[", r"\[").replace("]", r"\]")):
        heads.fit_head(cells, epochs=1, **kwargs)


def test_head_refuses_embeddings_of_another_width():
    cells = _cells(n=30)
    head = heads.fit_head(cells, embed_key="emb", target="label", epochs=1)
    cells.obsm["emb"] = cells.obsm["emb"][:, :3]
    with pytest.raises(StateError, match="has 3 columns, the head was trained on 4"):
        head.predict(cells)
