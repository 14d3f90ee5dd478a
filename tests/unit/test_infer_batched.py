"""The batched inference path equals the per-set path.

``infer`` rebuilds the state model without Lightning (``TransitionInferenceModel.predict_sets``,
one forward for many sets, the perturbation encoded once per set); the reference is the
LightningModule's ``predict_step`` called once per set, as arc-state does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from state.tx.infer.net import TransitionInferenceModel
from state.tx.infer.predictor import load_predictor
from state.tx.models.registry import load_model_checkpoint

FIX = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx"


def _per_set(module, ctrl, pert, batch):
    """One ``predict_step(padded=False)`` call per set: the reference path."""
    preds, counts = [], []
    for i in range(ctrl.shape[0]):
        item = {"ctrl_cell_emb": torch.from_numpy(ctrl[i]), "pert_emb": torch.from_numpy(pert[i]),
                "pert_name": ["x"] * ctrl.shape[1]}
        if batch is not None:
            item["batch"] = torch.from_numpy(batch[i])
        out = module.predict_step(item, 0, padded=False)
        preds.append(out["preds"].numpy())
        decoded = out.get("pert_cell_counts_preds")
        counts.append(None if decoded is None else decoded.numpy())
    return np.stack(preds), (None if counts[0] is None else np.stack(counts))


@pytest.mark.parametrize("model", ["state_llama", "state_gpt2"])
@pytest.mark.parametrize("set_len", [16, 5])
def test_batched_sets_equal_per_set_calls(model, set_len):
    run = FIX / model / "run"
    if not run.is_dir():
        pytest.skip(f"{model} fixture not copied")
    predictor = load_predictor(run)
    assert isinstance(predictor.module, TransitionInferenceModel)  # the lean batched path is under test
    assert not predictor.module.training
    module = load_model_checkpoint(run / "checkpoints" / "final.ckpt")  # the LightningModule
    rng = np.random.default_rng(0)
    n_sets = 6
    ctrl = rng.gamma(1.0, 1.0, size=(n_sets, set_len, predictor.input_dim)).astype(np.float32)
    names = rng.choice(predictor.pert_names, size=n_sets)
    pert = np.stack([np.broadcast_to(predictor.pert_vector(n), (set_len, len(predictor.pert_vector(n))))
                     for n in names]).astype(np.float32)
    batch = rng.integers(0, len(predictor.batch_map), size=(n_sets, set_len)) if predictor.uses_batch else None
    with torch.inference_mode():
        want_preds, want_counts = _per_set(module, ctrl, pert, batch)
        got_preds, got_counts = predictor.predict_sets(ctrl=ctrl, pert=pert, batch=batch, pert_names=list(names))
    assert got_preds.shape == (n_sets, set_len, want_preds.shape[-1])
    np.testing.assert_allclose(got_preds, want_preds, rtol=0, atol=1e-6)
    assert (got_counts is None) == (want_counts is None)
    if want_counts is not None:
        np.testing.assert_allclose(got_counts, want_counts, rtol=0, atol=1e-6)
    # the sets really differ, so a mix-up between sets would fail the comparison above
    assert not np.allclose(want_preds[0], want_preds[1])


def test_batch_indices_change_the_batched_prediction():
    run = FIX / "state_llama" / "run"
    if not run.is_dir():
        pytest.skip("state_llama fixture not copied")
    predictor = load_predictor(run)
    if not predictor.uses_batch:
        pytest.skip("fixture model has no batch encoder")
    rng = np.random.default_rng(1)
    ctrl = rng.gamma(1.0, 1.0, size=(2, 8, predictor.input_dim)).astype(np.float32)
    vec = predictor.pert_vector(predictor.pert_names[0])
    pert = np.broadcast_to(vec, (2, 8, vec.size)).astype(np.float32)
    with torch.inference_mode():
        zeros, _ = predictor.predict_sets(ctrl=ctrl, pert=pert, batch=np.zeros((2, 8), dtype=np.int64),
                                          pert_names=["a", "a"])
        ones, _ = predictor.predict_sets(ctrl=ctrl, pert=pert, batch=np.ones((2, 8), dtype=np.int64),
                                         pert_names=["a", "a"])
    assert not np.allclose(zeros, ones)


def test_loading_a_state_run_for_inference_does_not_import_lightning():
    """``infer`` rebuilds the state net without Lightning (whose import cost seconds per run)."""
    import subprocess
    import sys

    run = FIX / "state_llama" / "run"
    if not run.is_dir():
        pytest.skip("state_llama fixture not copied")
    code = (
        "import sys; from state.tx.infer.predictor import load_predictor; p = load_predictor(sys.argv[1]); "
        "print(type(p.module).__name__, 'lightning' in sys.modules, 'torchmetrics' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["TransitionInferenceModel", "False", "False"]


@pytest.mark.parametrize("drop", ["input_dim", "all"])
def test_a_checkpoint_without_model_dimensions_is_one_clear_error(tmp_path, drop):
    import shutil

    from state.utils.errors import StateError

    run = FIX / "state_llama" / "run"
    if not run.is_dir():
        pytest.skip("state_llama fixture not copied")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt_path = copy / "checkpoints" / "final.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    if drop == "all":
        ckpt["hyper_parameters"] = {}
    else:
        del ckpt["hyper_parameters"][drop]
    torch.save(ckpt, ckpt_path)
    expected = "has no hyper_parameters" if drop == "all" else "has no input_dim in its hyper_parameters"
    with pytest.raises(StateError, match=expected):
        load_predictor(copy)
    with pytest.raises(StateError, match=expected):
        load_model_checkpoint(ckpt_path)  # the LightningModule path says the same
