"""Run directories written by arc-state 0.11.1 load through our loaders, and our mean baselines
reproduce arc-state's predictions from its checkpoints (fixtures: tests/data/fixtures/tx/*/README.txt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from state.tx import rundir
from state.tx.models import registry
from state.tx.models.mean_baselines import ContextMeanPerturbationModel, PerturbMeanPerturbationModel

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx"
PERTS = ["TXG0023", "TXG0035", "TXG0057", "TXG0062", "TXG0073", "TXG0106", "TXG0122", "TXG0123", "non-targeting"]
RUNS = ["perturb_mean", "context_mean", "state_llama", "state_gpt2"]


def _run(name: str) -> Path:
    path = FIXTURES / name / "run"
    if not path.is_dir():
        pytest.skip(f"fixture {name} not copied into tests/data/fixtures/tx")
    return path


@pytest.mark.parametrize("name", RUNS)
def test_arc_state_run_dir_loads(name):
    contents = rundir.load_run_dir(_run(name))
    assert contents.perturbations == PERTS
    assert contents.cell_types == ["ctA", "ctB"] and contents.batches == ["gg1", "gg2", "gg3"]
    assert len(contents.genes) == 64 and all(isinstance(g, str) for g in contents.genes)
    dims = contents.var_dims
    assert (dims["input_dim"], dims["gene_dim"], dims["hvg_dim"], dims["output_dim"]) == (64, 256, 64, 64)
    assert (dims["pert_dim"], dims["batch_dim"]) == (9, 3) and type(dims["gene_dim"]) is int
    assert torch.equal(contents.pert_map["non-targeting"], torch.eye(9)[8])
    assert contents.config["data"]["kwargs"]["control_pert"] == "non-targeting"
    assert contents.config["name"] == "run"
    assert rundir.checkpoint_path(contents.path, "final.ckpt").is_file()


def _sets(expected: dict, prefix: str = "all_") -> list[dict]:
    offsets = expected["all_set_offsets"]
    sets = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        rows = slice(int(start), int(stop))
        sets.append({
            "ctrl_cell_emb": torch.from_numpy(expected[f"{prefix}ctrl_cell_emb"][rows]),
            "pert_emb": torch.from_numpy(expected[f"{prefix}pert_emb"][rows]),
            "pert_cell_emb": torch.from_numpy(expected[f"{prefix}pert_cell_emb"][rows]),
            "pert_name": [str(p) for p in expected[f"{prefix}pert_name"][rows]],
            "cell_type": [str(c) for c in expected[f"{prefix}cell_type"][rows]],
            "rows": rows,
        })
    return sets


@pytest.mark.parametrize(
    ("name", "cls"), [("perturb_mean", PerturbMeanPerturbationModel), ("context_mean", ContextMeanPerturbationModel)]
)
def test_mean_baseline_reproduces_arc_state_predictions(name, cls):
    ckpt = rundir.checkpoint_path(_run(name), "final.ckpt")
    model = registry.load_model_checkpoint(ckpt)  # class picked from the checkpoint's statistics key
    assert type(model) is cls and not model.training
    expected = dict(np.load(FIXTURES / name / "expected.npz", allow_pickle=False))
    with torch.no_grad():
        for one_set in _sets(expected):
            out = model.predict_step(one_set, 0, padded=False)
            rows = one_set["rows"]
            np.testing.assert_allclose(out["preds"].numpy(), expected["all_preds"][rows], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(out["pert_cell_counts_preds"].numpy(),
                                       expected["all_pert_cell_counts_preds"][rows], atol=1e-5, rtol=1e-5)
        padded = {
            "ctrl_cell_emb": torch.from_numpy(expected["padded_ctrl_cell_emb"]),
            "pert_emb": torch.from_numpy(expected["padded_pert_emb"]),
            "pert_cell_emb": torch.from_numpy(expected["padded_pert_cell_emb"]),
            "pert_name": [str(p) for p in expected["padded_pert_name"]],
            "cell_type": [str(c) for c in expected["padded_cell_type"]],
        }
        out = model.predict_step(padded, 0, padded=True)
    np.testing.assert_allclose(out["preds"].numpy(), expected["padded_preds"], atol=1e-5, rtol=1e-5)


def test_mean_baseline_statistics_survive_our_checkpoint_round_trip(tmp_path):
    """Loading arc-state's file and saving it our way keeps the statistics arc-state reads."""
    from state.io.safe_load import safe_torch_load

    source = safe_torch_load(_run("perturb_mean") / "checkpoints" / "final.ckpt")
    model = registry.load_model_checkpoint(_run("perturb_mean") / "checkpoints" / "final.ckpt")
    extras: dict = {}
    model.on_save_checkpoint(extras)
    assert set(extras) == {"global_basal", "pert_mean_offsets"}
    assert sorted(extras["pert_mean_offsets"]) == sorted(source["pert_mean_offsets"])
    for key, value in source["pert_mean_offsets"].items():
        assert isinstance(extras["pert_mean_offsets"][key], np.ndarray)
        np.testing.assert_array_equal(extras["pert_mean_offsets"][key], value)
    np.testing.assert_array_equal(extras["global_basal"], source["global_basal"])


def test_context_mean_unknown_cell_type_is_a_clear_error():
    from state.utils.errors import StateError

    model = registry.load_model_checkpoint(_run("context_mean") / "checkpoints" / "final.ckpt")
    batch = {"ctrl_cell_emb": torch.zeros(2, 64), "pert_cell_emb": torch.zeros(2, 64),
             "pert_name": ["TXG0023", "TXG0023"], "cell_type": ["ctZ", "ctZ"]}
    with pytest.raises(StateError, match="ctZ"):
        model(batch, padded=False)
