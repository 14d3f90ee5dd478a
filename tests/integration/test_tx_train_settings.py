"""Settings arc-state accepts and ignores, honoured here: ``training.ckpt_every_n_steps`` (last.ckpt on
its own interval, on by default) and weight decay (only with ``training.optimizer=adamw``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers.runs import TINY_STATE
from helpers.synthetic import make_processed_dataset, write_toml
from state.io.safe_load import safe_torch_load
from state.tx.config.compose import compose_tx_config
from state.tx.train.run import _apply_optimizer_choice, train
from state.utils.errors import StateError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    data = make_processed_dataset(root / "data", n_cells=160, n_genes=30, n_hvgs=12, n_perts=3, seed=1)
    return write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")


def _args(toml: Path, out: Path, name: str, *more: str, steps: int = 5) -> list[str]:
    return [f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene",
            "data.kwargs.num_workers=0", "data.kwargs.control_pert=non-targeting", "use_wandb=false",
            f"output_dir={out}", f"name={name}", f"training.max_steps={steps}", "training.batch_size=2",
            *TINY_STATE, *more]


def _step(path: Path) -> int:
    return int(safe_torch_load(path)["global_step"])


class _LastCkptRecorder(Callback):
    """At the start of every step: the step of checkpoints/last.ckpt (None while there is none)."""

    def __init__(self, ckpts: Path) -> None:
        self.ckpts, self.seen = ckpts, []

    def on_train_batch_start(self, trainer, *_args) -> None:
        last = self.ckpts / "last.ckpt"
        self.seen.append((trainer.global_step, _step(last) if last.is_file() else None))


def _recorded_run(monkeypatch, args: list[str]) -> tuple[list, object]:
    from state.tx.train import run as tx_run

    recorders = []
    original = tx_run._callbacks

    def with_recorder(training, run_dir, model_name):
        recorders.append(_LastCkptRecorder(run_dir / "checkpoints"))
        return [*original(training, run_dir, model_name), recorders[-1]]

    monkeypatch.setattr(tx_run, "_callbacks", with_recorder)
    result = train(compose_tx_config(args))
    return recorders[0].seen, result


def test_ckpt_every_n_steps_writes_last_ckpt_between_validations(synth, tmp_path, monkeypatch):
    # val_freq beyond the run: only the step interval can write last.ckpt before the end
    every = [*_args(synth, tmp_path, "every", "training.val_freq=100", "training.ckpt_every_n_steps=2")]
    seen, result = _recorded_run(monkeypatch, every)
    assert seen == [(0, None), (1, None), (2, 2), (3, 2), (4, 4)]
    ckpts = result.run_dir / "checkpoints"
    assert _step(ckpts / "final.ckpt") == 5 and not (ckpts / "best.ckpt").exists()
    seen, _ = _recorded_run(monkeypatch, _args(synth, tmp_path, "off", "training.val_freq=100",
                                               "training.ckpt_every_n_steps=0"))
    assert [last for _, last in seen] == [None] * 5  # off: last.ckpt only at val_freq (and at the end)
    # resuming from the interval checkpoint continues from its step
    resumed = train(compose_tx_config(_args(synth, tmp_path, "every", "training.val_freq=100",
                                            "training.ckpt_every_n_steps=2", steps=7)))
    assert resumed.resumed_from == ckpts / "last.ckpt" and resumed.global_step == 7


def test_weight_decay_only_with_adamw(synth, tmp_path):
    default = train(compose_tx_config(_args(synth, tmp_path, "adam", "training.val_freq=5", steps=3)))
    decayed = train(compose_tx_config(_args(synth, tmp_path, "adamw", "training.val_freq=5", "training.optimizer=adamw",
                                            "training.weight_decay=0.5", steps=3)))
    group = safe_torch_load(default.checkpoint_paths["final.ckpt"])["optimizer_states"][0]["param_groups"][0]
    assert group["weight_decay"] == 0  # arc-state's Adam: training.weight_decay=0.0005 is not applied
    ckpt = safe_torch_load(decayed.checkpoint_paths["final.ckpt"])
    assert ckpt["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.5
    assert "optimizer" not in ckpt["hyper_parameters"]  # ours, kept out of arc-state's keys
    a = safe_torch_load(default.checkpoint_paths["final.ckpt"])["state_dict"]
    b = ckpt["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_adamw_refused_for_models_with_their_own_optimizer():
    model = SimpleNamespace(honours_optimizer_choice=False)
    with pytest.raises(StateError, match="training.optimizer=adamw does not apply to model 'CPA'"):
        _apply_optimizer_choice(model, {"optimizer": "adamw", "weight_decay": 1e-4}, "CPA")
    _apply_optimizer_choice(model, {"optimizer": "adam"}, "CPA")  # the default is always fine


def test_bad_optimizer_values_are_named(synth, tmp_path):
    from state.tx.config.validate import validate_tx_config

    cfg = compose_tx_config(_args(synth, tmp_path, "bad", "training.optimizer=sgd", "training.ckpt_every_n_steps=-3"))
    with pytest.raises(StateError) as info:
        validate_tx_config(cfg)
    assert "training.optimizer='sgd' is not one of adam|adamw" in str(info.value)
    assert "training.ckpt_every_n_steps=-3" in str(info.value)
