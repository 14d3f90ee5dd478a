"""arc-state 0.11.1 State Transition checkpoints load safely and give arc-state's numbers.

Fixtures (tests/data/fixtures/tx/state_llama, state_gpt2) were written by arc-state itself; see
their README.txt. Tolerance: atol = rtol = 1e-5 (arc-state vs itself is bitwise; an independent
float32 implementation lands at ~4e-7).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from state.io.safe_load import safe_pickle_load
from state.tx.checkpoint import load_state_transition, read_checkpoint
from state.tx.models.state_transition import StateTransitionPerturbationModel
from state.utils.errors import StateError

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx"
NAMES = ["state_llama", "state_gpt2"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    root = FIXTURES / request.param
    model = load_state_transition(root / "run" / "checkpoints" / "final.ckpt")
    return request.param, root, model


def _batch(arrays: dict, rows, *, prefix: str = "") -> dict:
    batch = {
        "ctrl_cell_emb": torch.from_numpy(arrays[prefix + "ctrl_cell_emb"][rows]),
        "pert_emb": torch.from_numpy(arrays[prefix + "pert_emb"][rows]),
    }
    if prefix + "batch_onehot" in arrays:
        batch["batch"] = torch.from_numpy(arrays[prefix + "batch_onehot"][rows])
    elif prefix + "batch_index" in arrays:
        batch["batch"] = torch.from_numpy(arrays[prefix + "batch_index"][rows])
    return batch


def _check(out: dict, preds: np.ndarray, counts: np.ndarray) -> None:
    np.testing.assert_allclose(out["preds"].numpy(), preds, **TOL)
    np.testing.assert_allclose(out["pert_cell_counts_preds"].numpy(), counts, **TOL)


@torch.no_grad()
def test_every_test_set_matches_arc_state(fixture):
    name, root, model = fixture
    expected = dict(np.load(root / "expected.npz"))
    offsets = expected["all_set_offsets"]
    for start, stop in zip(offsets[:-1], offsets[1:]):
        rows = slice(int(start), int(stop))
        out = model.predict_step(_batch(expected, rows, prefix="all_"), 0, padded=False)
        assert out["preds"].shape == (stop - start, 64)
        _check(out, expected["all_preds"][rows], expected["all_pert_cell_counts_preds"][rows])


@torch.no_grad()
def test_padded_batch_matches_arc_state(fixture):
    _, root, model = fixture
    expected = dict(np.load(root / "expected.npz"))
    n_rows = int(expected["padded_B"]) * int(expected["padded_S"])
    out = model.predict_step(_batch(expected, slice(0, n_rows), prefix="padded_"), 0, padded=True)
    _check(out, expected["padded_preds"], expected["padded_pert_cell_counts_preds"])


@torch.no_grad()
def test_infer_trace_calls_match_arc_state(fixture):
    _, root, model = fixture
    trace = dict(np.load(root / "infer_trace.npz"))
    offsets = trace["call_offsets"]
    for start, stop in zip(offsets[:-1], offsets[1:]):
        rows = slice(int(start), int(stop))
        batch = {
            "ctrl_cell_emb": torch.from_numpy(trace["ctrl_cell_emb"][rows]),
            "pert_emb": torch.from_numpy(trace["pert_emb"][rows]),
        }
        if "batch_index" in trace:
            batch["batch"] = torch.from_numpy(trace["batch_index"][rows])
        out = model.predict_step(batch, 0, padded=False)
        _check(out, trace["preds"][rows], trace["pert_cell_counts_preds"][rows])


def test_gpt2_checkpoint_keeps_arc_state_causal_attention():
    model = load_state_transition(FIXTURES / "state_gpt2" / "run" / "checkpoints" / "final.ckpt")
    expected = np.load(FIXTURES / "state_gpt2" / "expected.npz")
    batch = _batch(dict(expected), slice(None))
    reversed_batch = {k: v.flip(0) for k, v in batch.items()}
    with torch.no_grad():
        forward = model(batch, padded=False)
        backward = model(reversed_batch, padded=False).flip(0)
    # Causal: the first cell only sees itself, so order matters for everything but the first-last pair.
    assert (forward - backward).abs().max() > 1e-4
    assert model.transformer_backbone.wpe.weight.shape == (16, 32)  # arc-state's shape, unchanged


def _train_kwargs(root: Path) -> dict:
    """Rebuild the keyword dict arc-state's `train` passes to the model (spec §4.1 step 6)."""
    cfg = yaml.safe_load((root / "run" / "config.yaml").read_text())
    var_dims = safe_pickle_load(root / "run" / "var_dims.pkl")
    model_kwargs = dict(cfg["model"]["kwargs"])
    model_kwargs["decoder_cfg"] = {
        "latent_dim": var_dims["output_dim"],
        "gene_dim": var_dims["hvg_dim"],
        "hidden_dims": model_kwargs.get("decoder_hidden_dims") or [1024, 1024, 512],
        "dropout": model_kwargs.get("decoder_dropout") or 0.1,
        "residual_decoder": model_kwargs.get("residual_decoder") or False,
    }
    data = cfg["data"]["kwargs"]
    return {
        **model_kwargs,
        **cfg["training"],
        "embed_key": data["embed_key"],
        "output_space": data["output_space"],
        "gene_names": var_dims["gene_names"],
        "batch_size": cfg["training"]["batch_size"],
        "control_pert": data["control_pert"],
        "input_dim": var_dims["input_dim"],
        "gene_dim": var_dims["hvg_dim"],
        "hvg_dim": var_dims["hvg_dim"],
        "output_dim": var_dims["output_dim"],
        "pert_dim": var_dims["pert_dim"],
        "batch_dim": var_dims["batch_dim"],
        "basal_mapping_strategy": data["basal_mapping_strategy"],
    }


@pytest.mark.parametrize("name", NAMES)
def test_new_model_has_arc_state_hparams_and_state_dict(name):
    root = FIXTURES / name
    reference = read_checkpoint(root / "run" / "checkpoints" / "final.ckpt")
    model = StateTransitionPerturbationModel(**_train_kwargs(root))
    assert list(model.hparams.keys()) == list(reference["hyper_parameters"].keys())
    assert dict(model.hparams) == reference["hyper_parameters"]
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference["state_dict"].items()}
    if name == "state_gpt2":
        # New runs size the (never-read) position table to cell_set_len + extra_tokens = 17 rows.
        assert ours.pop("transformer_backbone.wpe.weight") == (17, 32)
        theirs.pop("transformer_backbone.wpe.weight")
    assert ours == theirs
    assert list(model.state_dict()) == list(reference["state_dict"])


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _RunsCommand(marker)}}, path)
    with pytest.raises(StateError, match="refusing to load global"):
        load_state_transition(path)
    assert not marker.exists()
    with path.open("wb") as fh:  # a bare pickle, not a torch zip file
        pickle.dump({"state_dict": _RunsCommand(marker)}, fh)
    with pytest.raises(StateError):
        load_state_transition(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"pert_mean_offsets": {}, "global_basal": np.zeros(3)}, "perturb_mean"),
        ({"celltype_pert_means": {}}, "context_mean"),
        ({"cfg_yaml": "model: {}", "protein_embeds_dict": {}}, "State Embedding"),
    ],
)
def test_wrong_checkpoint_kind_is_one_line_error(tmp_path, extra, words):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"dummy_param": torch.zeros(1)}, "hyper_parameters": {"a": 1}, **extra}, path)
    with pytest.raises(StateError, match=words) as info:
        load_state_transition(path)
    assert "\n" not in str(info.value)
