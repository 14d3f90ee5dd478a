"""`state emb fit` training parity: step-deterministic for a fixed seed, `model.ema` (a moving average of
the gradients, kept in checkpoints), FLOPs per step logged as tx logs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from state.config_paths import configs_dir
from state.emb.callbacks import GradientEMA, SEFlopsMonitor
from state.emb.config import compose_emb_config
from state.emb.data.synthetic import make_se_corpus
from state.emb.fit import fit
from state.emb.preprocess import preprocess
from state.io.safe_load import safe_torch_load

TINY = [
    "embeddings.current=toy", "dataset.current=toy", "experiment.name=toy", "wandb.enable=false",
    "model.batch_size=8", "model.emsize=32", "model.d_hid=64", "model.nhead=4", "model.nlayers=2",
    "model.output_dim=32", "dataset.pad_length=32", "dataset.P=8", "dataset.N=8", "dataset.S=8",
    "dataset.num_train_workers=0", "dataset.num_val_workers=0", "experiment.num_epochs=1",
    "experiment.val_check_interval=100", "experiment.limit_val_batches=0",
    "experiment.checkpoint.every_n_train_steps=100", "experiment.checkpoint.save_top_k=1",
    "optimizer.gradient_accumulation_steps=1", "optimizer.max_lr=0.001", "model.dropout=0.1",
]


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emb_fit_parity")
    corpus = make_se_corpus(root / "corpus", seed=1)
    path = root / "conf.yaml"
    shutil.copy(configs_dir() / "state-defaults.yaml", path)
    preprocess(profile_name="toy", train_csv=corpus.train_csv, val_csv=corpus.val_csv,
               output_dir=root / "profile", config_file=path, all_embeddings=corpus.gene_embeddings)
    return path


class _Recorder(Callback):
    """The training loss of every step, and the FLOPs per step the SE FLOPs callback counted."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.flops_per_batch: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        monitors = [c for c in trainer.callbacks if isinstance(c, SEFlopsMonitor)]
        self.flops_per_batch = monitors[0].flops_per_batch if monitors else None


def _train(conf: Path, out: Path, *extra: str):
    recorder = _Recorder()
    result = fit(compose_emb_config(str(conf), [*TINY, f"experiment.checkpoint.path={out}", *extra]),
                 extra_callbacks=[recorder])
    metrics = pd.read_csv(next((out / "toy" / "csv_logs").glob("version_*/metrics.csv")))
    return result, metrics, recorder


def test_two_fresh_runs_give_the_same_loss_at_every_step_and_log_flops(conf, tmp_path):
    first, m1, r1 = _train(conf, tmp_path / "a", "experiment.num_epochs=2")
    second, _, r2 = _train(conf, tmp_path / "b", "experiment.num_epochs=2")
    assert first.global_step == second.global_step == len(r1.losses) > 5
    assert r1.losses == r2.losses  # bit for bit, step by step
    # FLOPs per step counted once (tx's callback), logged cumulatively
    assert r1.flops_per_batch and r1.flops_per_batch > 0
    flops = m1.dropna(subset=["cumulative_flops"])
    assert len(flops) >= 1
    steps = flops["cumulative_flops"].to_numpy() / r1.flops_per_batch  # whole steps (logged as float32)
    assert np.allclose(steps, steps.round(), rtol=1e-5) and (steps.round() >= 1).all()
    # another seed: another run
    _, _, r3 = _train(conf, tmp_path / "c", "experiment.num_epochs=2", "dataset.seed=7")
    assert r3.losses != r1.losses


def test_ema_averages_gradients_and_checkpoints_carry_the_averages(conf, tmp_path):
    result, _, _ = _train(conf, tmp_path / "ema", "model.ema=true", "model.ema_decay=0.9")
    ckpt = safe_torch_load(result.last_checkpoint)
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("GradientEMA")]
    assert len(states) == 1 and states[0]["decay"] == 0.9
    averages = states[0]["averages"]
    assert "net.transformer_encoder.layers.0.linear1.weight" in averages
    assert all(v.abs().sum() > 0 for v in averages.values())
    plain, _, _ = _train(conf, tmp_path / "plain")
    a = safe_torch_load(result.last_checkpoint)["state_dict"]
    b = safe_torch_load(plain.last_checkpoint)["state_dict"]
    key = "transformer_encoder.layers.0.linear1.weight"
    assert not torch.equal(a[key], b[key])  # the averaged gradients trained another model


def test_gradient_ema_is_a_zero_started_moving_average_of_the_gradients():
    layer = torch.nn.Linear(2, 1, bias=False)
    ema = GradientEMA(0.5)
    grads = [torch.tensor([[2.0, 4.0]]), torch.tensor([[0.0, 8.0]])]
    expected = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 5.0]])]  # 0.5 m + 0.5 g, m0 = 0
    for grad, want in zip(grads, expected, strict=True):
        layer.weight.grad = grad.clone()
        ema.on_before_optimizer_step(None, layer, None)
        torch.testing.assert_close(layer.weight.grad, want)
    restored = GradientEMA(0.5)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.averages["weight"], expected[-1])
