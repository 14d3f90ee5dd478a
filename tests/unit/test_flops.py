"""FLOPs accounting: exact counts for a known layer, and the metrics a training run logs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from state.__main__ import main
from state.training.flops import count_forward_flops

ROOT = Path(__file__).resolve().parents[2]


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 4, bias=False)

    def forward(self, batch):
        return self.layer(batch["x"])


def test_forward_flops_of_a_matmul_are_exact():
    # [10, 8] @ [8, 4]: 2 * 10 * 8 * 4 multiply-adds
    assert count_forward_flops(_Linear(), {"x": torch.ones(10, 8)}) == 640


def test_training_logs_cumulative_flops_and_mfu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["tx", "train", "+experiment=demo", "training.max_steps=4", "training.val_freq=4",
                 "training.use_mfu=true", "training.mfu_kwargs.logging_interval=2", f"output_dir={tmp_path}"]) == 0
    metrics = pd.read_csv(tmp_path / "demo" / "version_0" / "metrics.csv")
    flops = metrics[["step", "cumulative_flops"]].dropna()
    assert (flops["cumulative_flops"].diff().dropna() > 0).all()
    assert metrics["flops_per_batch"].dropna().nunique() == 1
    assert (metrics["mfu (%)"].dropna() > 0).all()


def test_mfu_is_per_gpu_whatever_the_world_size(monkeypatch):
    """Each rank counts its own batch's FLOPs: MFU divides them by one device's peak, not world x peak."""
    from types import SimpleNamespace

    from state.training import flops

    monitor = flops.FlopsMonitor(mfu_kwargs={"available_flops": 1e12, "logging_interval": 1, "window_size": 2})
    monitor.flops_per_batch = int(5e11)
    logged = {}
    module = SimpleNamespace(log_dict=lambda metrics, **_: logged.update(metrics))
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(flops.time, "perf_counter", lambda: next(clock))
    for step in (1, 2, 3):
        trainer = SimpleNamespace(global_step=step, world_size=8)
        monitor.on_train_batch_end(trainer, module, None, None, step)
    assert logged["mfu (%)"] == 50.0  # 5e11 FLOPs per second-long step on a 1e12 FLOP/s device
