"""Runs composed with arc-state 0.11.3's model YAMLs (log1p_from_raw_counts / counts_target_sum) stay
loadable by arc-state 0.11.1, and carry 0.11.3's keys for 0.11.3.

The arc-state side runs only where arc-state 0.11.1 is installed: ARC_STATE_PYTHON=<its venv's python>
(see ../shared/ARC_STATE.md; a venv made with --system-site-packages plus `pip install --no-deps
arc-state==0.11.1` is enough). Our side always runs."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from helpers.runs import TINY_STATE
from helpers.synthetic import make_processed_dataset, write_toml
from state.io.safe_load import safe_torch_load
from state.tx.config.compose import compose_tx_config
from state.tx.train.run import train

ARC_PYTHON = os.environ.get("ARC_STATE_PYTHON")

# arc-state 0.11.1 loading one of our checkpoints the way its `predict` does, then predicting one set.
_ARC_LOAD = textwrap.dedent("""
    import sys, torch
    from state.tx.models.state_transition import StateTransitionPerturbationModel
    from state.tx.models.perturb_mean import PerturbMeanPerturbationModel
    cls = {"state": StateTransitionPerturbationModel, "perturb_mean": PerturbMeanPerturbationModel}[sys.argv[2]]
    model = cls.load_from_checkpoint(sys.argv[1], weights_only=False, map_location="cpu").eval()
    hp = model.hparams
    n = 4
    batch = {"ctrl_cell_emb": torch.rand(n, hp["input_dim"]), "pert_emb": torch.eye(hp["pert_dim"])[[1] * n],
             "pert_name": ["x"] * n}
    with torch.no_grad():
        out = model.predict_step(batch, 0, padded=False)
    print("LOADED", hp["log1p_from_raw_counts"], hp["counts_target_sum"], tuple(out["preds"].shape))
""")


@pytest.fixture(scope="module")
def toml(tmp_path_factory):
    root = tmp_path_factory.mktemp("k0113")
    data = make_processed_dataset(root / "data", n_cells=120, n_genes=24, n_hvgs=10, n_perts=3, seed=2)
    return write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")


@pytest.mark.parametrize("model", ["state", "perturb_mean"])
def test_our_run_carries_0_11_3_keys_and_arc_state_0_11_1_loads_it(model, toml, tmp_path):
    args = [f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene",
            "data.kwargs.num_workers=0", "data.kwargs.control_pert=non-targeting", "use_wandb=false",
            f"output_dir={tmp_path}", "name=run", "training.max_steps=2", "training.val_freq=2",
            "training.batch_size=2", *(TINY_STATE if model == "state" else
                                       ["model=perturb_mean", "model.kwargs.cell_set_len=8",
                                        "+model.kwargs.decoder_hidden_dims=[16]"])]
    final = train(compose_tx_config(args)).checkpoint_paths["final.ckpt"]
    hp = safe_torch_load(final)["hyper_parameters"]
    assert (hp["log1p_from_raw_counts"], hp["counts_target_sum"]) == (False, 10000)
    if not ARC_PYTHON:
        pytest.skip("arc-state 0.11.1 side: set ARC_STATE_PYTHON to its venv's python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([ARC_PYTHON, "-c", _ARC_LOAD, str(final), model], env=env, cwd=Path(final).parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED False 10000" in done.stdout
