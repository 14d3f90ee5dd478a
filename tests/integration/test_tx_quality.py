"""The quality models end to end on CPU: ``linear`` and ``state_plus`` train, predict and infer through
the CLI on the same run directories as every other model."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.synthetic import make_processed_dataset, write_toml
from state.__main__ import main
from state.io.safe_load import safe_torch_load

TINY_PLUS = ["model.kwargs.cell_set_len=8", "model.kwargs.hidden_dim=16",
             *[f"model.kwargs.transformer_backbone_kwargs.{k}={v}" for k, v in
               {"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 2, "head_dim": 8}.items()]]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    data = make_processed_dataset(root / "data", n_cells=300, n_genes=30, n_hvgs=12, n_perts=4, n_celltypes=3,
                                  seed=1)
    toml = write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")
    return {"data": data, "toml": toml}


@pytest.fixture(scope="module")
def synth_wide(tmp_path_factory):
    """Eight perturbations: enough for the gate to hold some out of the contexts without val ones."""
    root = tmp_path_factory.mktemp("quality_wide")
    data = make_processed_dataset(root / "data", n_cells=600, n_genes=40, n_hvgs=12, n_perts=8, n_celltypes=3,
                                  seed=1)
    return {"data": data, "toml": write_toml(root / "split.toml", dataset_name="synth", data_path=data,
                                             kind="fewshot")}


def _train(synth, out: Path, model: str, *more: str, steps: int = 4) -> Path:
    args = [f"data.kwargs.toml_config_path={synth['toml']}", "data.kwargs.embed_key=X_hvg",
            "data.kwargs.output_space=gene", "data.kwargs.num_workers=0", "data.kwargs.control_pert=non-targeting",
            f"model={model}", "use_wandb=false", f"output_dir={out}", "name=run", f"training.max_steps={steps}",
            "training.val_freq=2", "training.batch_size=2", "model.kwargs.cell_set_len=8", *more]
    assert main(["tx", "train", *args]) == 0
    return out / "run"


def _predict_and_infer(run: Path, synth, tmp_path: Path) -> np.ndarray:
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "final.ckpt", "--predict-only"]) == 0
    pred = ad.read_h5ad(run / "eval_final.ckpt" / "adata_pred.h5ad")
    assert pred.n_obs > 0 and np.isfinite(np.asarray(pred.X)).all()
    out = tmp_path / "simulated.h5ad"
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(synth["data"]), "--embed-key", "X_hvg",
                 "--pert-col", "gene", "--output", str(out), "--quiet"]) == 0
    simulated = ad.read_h5ad(out)
    values = np.asarray(simulated.obsm["X_hvg"])
    assert np.isfinite(values).all()
    return values


def test_linear_fits_in_one_step_and_predicts_control_plus_its_line(synth, tmp_path):
    run = _train(synth, tmp_path, "linear")
    ckpt = safe_torch_load(run / "checkpoints" / "final.ckpt")
    assert ckpt["global_step"] == 1 and ckpt["hyper_parameters"]["ridge"] == "auto"
    lines = ckpt["linear_context_lines"]
    assert set(lines) == {"HepG2", "Jurkat", "K562"} and all(v.shape == (2, 12) for v in lines.values())
    cv = ckpt["linear_ridge_cv"]  # what the CV chose per context, and every candidate's error
    assert set(cv) == set(lines) and all(len(c["candidates"]) == len(c["cv_error"]) >= 1 for c in cv.values())
    simulated = _predict_and_infer(run, synth, tmp_path)
    source = ad.read_h5ad(synth["data"])
    is_control = (source.obs["gene"] == "non-targeting").to_numpy()
    shift = simulated - np.asarray(source.obsm["X_hvg"])
    assert not np.allclose(shift[~is_control], 0.0)


def test_state_plus_trains_with_its_recipe_and_predicts_and_infers(synth, tmp_path):
    run = _train(synth, tmp_path, "state_plus", *TINY_PLUS[1:], steps=5)
    ckpt = safe_torch_load(run / "checkpoints" / "final.ckpt")
    hp = ckpt["hyper_parameters"]
    # validations at steps 2 and 4; the last step was never validated, so the gate judged it at the end
    assert [h["step"] for h in ckpt["state_plus_gate"]["history"]] == [2, 4, 5]
    assert hp["lr_schedule"] == "cosine" and hp["set_mean_weight"] == 1.0 and hp["response_features"]
    assert ckpt["state_tx_model"] == "state_plus"
    assert hp["residual_base"] == "linear" and set(ckpt["state_plus_linear_lines"]) == {"HepG2", "Jurkat", "K562"}
    assert hp["linear_ridge"] == "auto" and set(ckpt["state_plus_linear_ridge_cv"]) == {"HepG2", "Jurkat", "K562"}
    # the perturbation encoder reads the one-hot vector and the response (pert_dim + output_dim)
    first = next(k for k in ckpt["state_dict"] if k.startswith("pert_encoder.") and k.endswith("weight"))
    assert ckpt["state_dict"][first].shape[1] == hp["pert_dim"] + hp["output_dim"]
    stored = ckpt["mean_responses"]
    assert len(stored["perturbations"]) == len(stored["values"]) > 0
    columns = (run / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/set_mean_loss" in columns
    _predict_and_infer(run, synth, tmp_path)


def test_predict_baselines_scores_perturb_mean_and_linear_beside_the_model(synth, tmp_path, capsys):
    run = _train(synth, tmp_path, "linear")
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "final.ckpt", "--baselines"]) == 0
    assert "model vs free baselines" in capsys.readouterr().out
    eval_dir = run / "eval_final.ckpt"
    table = pd.read_csv(eval_dir / "baselines_comparison.csv", index_col=0)
    assert list(table.columns) == ["model", "perturb_mean", "linear"]
    assert table.loc["pearson_delta"].notna().all()
    assert (eval_dir / "baselines_comparison.png").stat().st_size > 0
    assert list((eval_dir / "baseline_linear").glob("*_agg_results.csv"))


@pytest.mark.parametrize("model, key", [("linear", "ridge"), ("state_plus", "linear_ridge")])
def test_a_bad_ridge_stops_training_with_one_line_and_writes_nothing(synth, tmp_path, capsys, model, key):
    code = main(["tx", "train", f"data.kwargs.toml_config_path={synth['toml']}", "data.kwargs.embed_key=X_hvg",
                 "data.kwargs.num_workers=0", "data.kwargs.control_pert=non-targeting", f"model={model}",
                 "use_wandb=false", f"output_dir={tmp_path}", "name=run", f"model.kwargs.{key}=-1"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and f"model.kwargs.{key}=-1" in err[0] and "auto" in err[0]
    assert not (tmp_path / "run").exists()


def test_state_plus_gate_predicts_the_base_when_the_correction_is_useless(synth_wide, tmp_path, caplog):
    """A learning rate far too high for 4 steps makes the correction noise: the gate must drop it."""
    run = _train(synth_wide, tmp_path, "state_plus", *TINY_PLUS[1:], "training.lr=0.05", steps=4)
    assert "the learned correction never beat its base" in caplog.text
    ckpt = safe_torch_load(run / "checkpoints" / "final.ckpt")
    record = ckpt["state_plus_gate"]
    assert record["blend"] == 0.0 and [h["step"] for h in record["history"]] == [2, 4]
    assert all(h["n_groups"] >= 2 for h in record["history"])

    from state.tx.models.registry import load_model_checkpoint

    model = load_model_checkpoint(run / "checkpoints" / "final.ckpt")
    assert model.blend == 0.0 and "blend 0" in model.describe_choices()
    rng = np.random.default_rng(0)
    n, hp = 6, ckpt["hyper_parameters"]
    perts = sorted({p for _, p in model.responses.responses})[:2]
    batch = {"pert_emb": torch.eye(hp["pert_dim"])[[0] * n], "ctrl_cell_emb": torch.tensor(
        rng.uniform(1.0, 2.0, size=(n, hp["input_dim"])), dtype=torch.float32),
             "pert_name": [perts[i % 2] for i in range(n)], "cell_type": ["K562"] * n}
    with torch.no_grad():
        gated = model.predict_step(batch, padded=False)["preds"]
        base = (batch["ctrl_cell_emb"] + model._response_rows(batch, (1, n)).reshape(n, -1)).clamp_min(0.0)
        model.blend = 1.0
        full = model.predict_step(batch, padded=False)["preds"]
    torch.testing.assert_close(gated, base)
    assert (full - base).abs().max() > 1e-3  # without the gate the useless correction would be predicted
