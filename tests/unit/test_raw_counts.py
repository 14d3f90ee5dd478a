"""model.kwargs.log1p_from_raw_counts / counts_target_sum (arc-state main, PR #274)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from state.tx.models.mean_baselines import ContextMeanPerturbationModel, PerturbMeanPerturbationModel
from state.tx.models.raw_counts import RawCounts, log1p_normalize
from state.utils.errors import StateError

sys.path.insert(0, str(Path(__file__).parent))
from test_st_model import make_model  # noqa: E402

ON = RawCounts(enabled=True, target_sum=1e4, embed_key="X_hvg")


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    return torch.expm1(t.double()).sum(-1)


def test_worked_example():
    got = log1p_normalize(torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]), 1e4)
    expected = np.log1p(np.array([[2500, 7500, 0], [0, 0, 0]], dtype=np.float32))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_batch_keys_input_untouched_and_pass_through():
    counts = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 4.0]])
    batch = {"ctrl_cell_emb": counts.clone(), "pert_cell_emb": counts.clone(), "pert_cell_counts": counts.clone(),
             "pert_emb": torch.eye(2), "pert_name": ["a", "b"]}
    out = ON.apply(batch)
    assert out is not batch and torch.equal(batch["ctrl_cell_emb"], counts)  # not in place
    assert out["pert_emb"] is batch["pert_emb"] and out["pert_name"] is batch["pert_name"]
    for key in ("ctrl_cell_emb", "pert_cell_emb", "pert_cell_counts"):
        np.testing.assert_allclose(_row_sums(out[key]).numpy(), [1e4, 1e4], rtol=1e-5)
    learned = RawCounts(enabled=True, embed_key="X_state").apply(batch)
    assert learned["ctrl_cell_emb"] is batch["ctrl_cell_emb"]  # an embedding is never touched ...
    np.testing.assert_allclose(_row_sums(learned["pert_cell_counts"]).numpy(), [1e4, 1e4], rtol=1e-5)  # counts are
    assert RawCounts(enabled=False).apply(batch) is batch


@pytest.mark.parametrize("target", [0, -5, float("inf")])
def test_target_must_be_positive(target):
    with pytest.raises(StateError, match="counts_target_sum must be positive"):
        RawCounts.from_kwargs({"log1p_from_raw_counts": True, "counts_target_sum": target}, embed_key=None)
    RawCounts.from_kwargs({"counts_target_sum": target}, embed_key=None)  # off: not checked


def test_predict_step_returns_normalized_fields_and_hparams_carry_the_keys():
    model = make_model(log1p_from_raw_counts=True)
    assert model.hparams["log1p_from_raw_counts"] is True and model.hparams["counts_target_sum"] == 10000.0
    counts = torch.poisson(torch.full((8, 12), 3.0))
    batch = {"ctrl_cell_emb": counts, "pert_cell_emb": counts + 1, "pert_cell_counts": counts + 2,
             "pert_emb": torch.eye(5)[torch.zeros(8, dtype=torch.long)], "pert_name": ["p"] * 8}
    with torch.no_grad():
        out = model.predict_step(batch, 0, padded=False)
    for key in ("ctrl_cell_emb", "pert_cell_emb", "pert_cell_counts"):
        np.testing.assert_allclose(_row_sums(out[key]).numpy(), np.full(8, 1e4), rtol=1e-4)
    plain = make_model()
    assert "log1p_from_raw_counts" not in plain.hparams  # 0.11.1 checkpoints keep 0.11.1's keys
    with torch.no_grad():
        expected = plain.predict_step({**batch, "ctrl_cell_emb": log1p_normalize(counts, 1e4)}, 0, padded=False)
        fast, _ = model.predict_sets(ctrl=counts[None].numpy(), pert=batch["pert_emb"][None].numpy())
    np.testing.assert_allclose(out["preds"].numpy(), expected["preds"].numpy(), atol=1e-5)
    np.testing.assert_allclose(fast.reshape(8, -1), out["preds"].numpy(), atol=1e-5)  # infer's batched path


def _fit_statistics(model, batch):
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(train_dataloader=lambda: [batch]), predicting=False)
    model.on_fit_start()


def _baseline_batch():
    ctrl = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 0.0]])
    pert = torch.tensor([[0.0, 1.0, 1.0], [4.0, 0.0, 4.0]])
    return {"pert_cell_emb": torch.cat([ctrl, pert]), "ctrl_cell_emb": torch.cat([ctrl, ctrl]),
            "cell_type": ["CT1"] * 4, "pert_name": ["ctl", "ctl", "P1", "P1"]}, ctrl, pert


def _baseline_kwargs(**extra):
    return dict(input_dim=3, hidden_dim=3, output_dim=3, pert_dim=2, control_pert="ctl", embed_key="X_hvg",
                output_space="embedding", log1p_from_raw_counts=True, counts_target_sum=1e4, **extra)


def test_baselines_compute_their_statistics_in_normalized_space():
    batch, ctrl, pert = _baseline_batch()
    norm_ctrl = log1p_normalize(ctrl, 1e4).double().mean(0).numpy()
    norm_pert = log1p_normalize(pert, 1e4).double().mean(0).numpy()
    perturb_mean = PerturbMeanPerturbationModel(**_baseline_kwargs())
    _fit_statistics(perturb_mean, batch)
    np.testing.assert_allclose(perturb_mean.global_basal, norm_ctrl, rtol=1e-6)
    np.testing.assert_allclose(perturb_mean.pert_mean_offsets["P1"], norm_pert - norm_ctrl, rtol=1e-5, atol=1e-6)
    context_mean = ContextMeanPerturbationModel(**_baseline_kwargs())
    _fit_statistics(context_mean, batch)
    np.testing.assert_allclose(context_mean.celltype_pert_means["CT1"], norm_pert, rtol=1e-6)
