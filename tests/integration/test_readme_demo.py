"""The README's first commands stay true: the demo overlay trains, and equals its spelled-out form."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from state.__main__ import main
from state.tx.config.compose import compose_tx_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _spelled_out_overrides() -> list[str]:
    block = re.search(r"spelled out it is\n\n```bash\n(.*?)```", README, re.S).group(1)
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:3] == ["state", "tx", "train"]
    return words[3:]


def test_readme_first_lines_are_install_demo_and_tests():
    lines = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert lines[0].startswith("pip install torch==2.13.0 && pip install -e")
    assert lines[0].endswith("state tx train +experiment=demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert lines[1] in ci.splitlines()  # CI runs exactly the README's test command


def test_demo_overlay_equals_spelled_out_overrides():
    overlay = OmegaConf.to_container(compose_tx_config(["+experiment=demo"]), resolve=True)
    spelled = OmegaConf.to_container(compose_tx_config(_spelled_out_overrides()), resolve=True)
    assert overlay == spelled
    assert overlay["model"]["name"] == "state"  # the default model, shrunk


def test_demo_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example TOML uses paths relative to the repository root
    out = tmp_path / "runs"
    assert main(["tx", "train", "+experiment=demo", "training.max_steps=6", "training.val_freq=3",
                 f"output_dir={out}"]) == 0
    run = out / "demo"
    for name in ("config.yaml", "var_dims.pkl", "pert_onehot_map.pt", "checkpoints/final.ckpt",
                 "version_0/metrics.csv"):
        assert (run / name).is_file(), name


@pytest.mark.slow
def test_full_demo_learns(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(ROOT)
    assert main(["tx", "train", "+experiment=demo", f"output_dir={tmp_path}"]) == 0
    metrics = pd.read_csv(tmp_path / "demo" / "version_0" / "metrics.csv")
    val = metrics["val_loss"].dropna().to_numpy()
    train = metrics["train_loss"].dropna().to_numpy()
    assert val[-1] < 0.5 and train[-1] < train[0] / 2
