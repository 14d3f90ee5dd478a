"""`tx train` with training.precision=bf16-mixed on CPU: runs, and its losses stay close to 32-true's."""

from __future__ import annotations

import math

import pytest

from helpers.runs import TINY_STATE
from helpers.synthetic import make_processed_dataset, write_toml
from state.io.safe_load import safe_torch_load
from state.tx.config.compose import compose_tx_config
from state.tx.train.run import train


@pytest.fixture(scope="module")
def toml(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    data = make_processed_dataset(root / "data", n_cells=240, n_genes=40, n_hvgs=16, n_perts=4, seed=0)
    return write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")


def _run(toml, out, precision: str):
    overrides = [f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg",
                 "data.kwargs.output_space=gene", "data.kwargs.num_workers=0", "use_wandb=false",
                 "data.kwargs.control_pert=non-targeting", f"output_dir={out}", f"name={precision}",
                 "training.max_steps=4", "training.val_freq=2", "training.batch_size=2",
                 f"training.precision={precision}", *TINY_STATE]
    return train(compose_tx_config(overrides))


def test_bf16_mixed_trains_to_the_losses_of_32_true(toml, tmp_path):
    full = _run(toml, tmp_path, "32-true")
    mixed = _run(toml, tmp_path, "bf16-mixed")
    assert mixed.global_step == full.global_step == 4
    for key in ("train_loss", "val_loss"):
        assert math.isfinite(mixed.metrics[key]), key
        assert mixed.metrics[key] == pytest.approx(full.metrics[key], rel=5e-3), key  # measured: ~1e-3 apart
    ckpt = safe_torch_load(mixed.checkpoint_paths["final.ckpt"])
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"] is True  # with gradient clipping on
