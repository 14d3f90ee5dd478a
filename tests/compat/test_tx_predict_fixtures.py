"""`state tx predict` on a run directory written by arc-state 0.11.1 (moved to a new place)."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from state.__main__ import main

FIX = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx" / "state_llama"


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory) -> tuple[Path, Path]:
    """arc-state's run dir and TOML copied elsewhere: the absolute paths stored inside no longer exist."""
    root = tmp_path_factory.mktemp("arc_run")
    shutil.copytree(FIX / "run", root / "run")
    data_dir = FIX / "data" / "processed"
    toml = root / "split.toml"
    text = (FIX / "data" / "split_fewshot.toml").read_text()
    toml.write_text(text.replace("/data/state-fixtures/tx/state_llama/data/processed", str(data_dir)))
    return root / "run", toml


def test_predict_reproduces_arc_state_and_scores(moved_run, capsys):
    run, toml = moved_run
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "final.ckpt", "--toml", str(toml),
                 "--profile", "minimal"]) == 0
    out = run / "eval_final.ckpt"
    pred, real = ad.read_h5ad(out / "adata_pred.h5ad"), ad.read_h5ad(out / "adata_real.h5ad")
    expected = np.load(FIX / "expected.npz")
    # arc-state's predict writes clip(preds, 0, 14) in the order cell-load's test loader yields sets.
    assert pred.obs["gene"].astype(str).tolist() == expected["all_pert_name"].tolist()
    np.testing.assert_allclose(pred.X, np.clip(expected["all_preds"], 0, 14), atol=1e-5)
    np.testing.assert_allclose(real.X, np.clip(expected["all_pert_cell_emb"], 0, 14), atol=1e-6)
    assert list(pred.obs.columns[:3]) == ["gene", "cell_type", "gem_group"]
    assert pred.var["gene_name"].tolist()[:2] == ["TXG0015", "TXG0016"]  # arc-state leaves var empty; we name genes
    results = pd.read_csv(out / "ctB_results.csv")
    assert set(results["perturbation"]) == {"TXG0057", "TXG0062"}
    assert (out / "ctB_agg_results.csv").is_file()
    assert (out / "predicted_vs_observed_change.png").stat().st_size > 1000
    assert "mean metric per cell type" in capsys.readouterr().out


def test_predict_pseudobulk_and_shared_only(moved_run):
    run, toml = moved_run
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "final.ckpt", "--toml", str(toml),
                 "--predict-only", "--pseudobulk"]) == 0
    pred = ad.read_h5ad(run / "eval_final.ckpt" / "adata_pred.h5ad")
    assert pred.n_obs == 3  # ctB x {control, TXG0057, TXG0062}
    assert pred.obs["pseudobulk_n_cells"].sum() == 112
    expected = np.load(FIX / "expected.npz")
    mask = expected["all_pert_name"] == "TXG0057"
    row = pred.obs["gene"].astype(str).tolist().index("TXG0057")
    np.testing.assert_allclose(pred.X[row], np.clip(expected["all_preds"][mask].mean(0), 0, 14), atol=1e-5)


def test_predict_without_toml_says_how_to_fix(moved_run, capsys):
    run, _ = moved_run
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "final.ckpt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--toml" in err[0]


def test_predict_unknown_checkpoint_lists_available(moved_run, capsys):
    run, toml = moved_run
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "nope.ckpt", "--toml", str(toml)]) == 2
    assert "final.ckpt" in capsys.readouterr().err



def _fixture_sets(expected, names):
    import torch

    offsets = expected["all_set_offsets"]
    for i in range(offsets.size - 1):
        rows = slice(offsets[i], offsets[i + 1])
        yield {
            "ctrl_cell_emb": torch.from_numpy(expected["all_ctrl_cell_emb"][rows]),
            "pert_cell_emb": torch.from_numpy(expected["all_pert_cell_emb"][rows]),
            "pert_emb": torch.from_numpy(expected["all_pert_emb"][rows]),
            "batch": torch.from_numpy(expected["all_batch_index"][rows]),
            "pert_name": list(names[rows]),
        }


def test_test_time_finetune_trains_on_control_sets_only():
    import torch

    from state.tx.models.registry import load_model_checkpoint
    from state.tx.predict.run import _test_time_finetune

    expected = np.load(FIX / "expected.npz")
    names = expected["all_pert_name"]
    model = load_model_checkpoint(FIX / "run" / "checkpoints" / "final.ckpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    no_controls = [b for b in _fixture_sets(expected, names) if b["pert_name"][0] != "non-targeting"]
    _test_time_finetune(model, no_controls, epochs=2, control="non-targeting")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _test_time_finetune(model, list(_fixture_sets(expected, names)), epochs=1, control="non-targeting")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert "pert_encoder.0.weight" in changed and not model.training
    assert max((model.state_dict()[k] - before[k]).abs().max().item() for k in changed) < 1e-3  # lr 1e-5


def test_predict_cli_with_test_time_finetune_runs(moved_run):
    run, toml = moved_run
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "final.ckpt", "--toml", str(toml),
                 "--predict-only", "--skip-adatas", "--test-time-finetune", "1"]) == 0


def test_predict_takes_checkpoint_names_without_suffix(moved_run):
    run, toml = moved_run
    shutil.rmtree(run / "eval_final.ckpt", ignore_errors=True)
    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "final", "--toml", str(toml),
                 "--predict-only", "--skip-adatas"]) == 0
    assert (run / "eval_final.ckpt").is_dir()  # named after the file, as with --checkpoint final.ckpt
