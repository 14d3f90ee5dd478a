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
