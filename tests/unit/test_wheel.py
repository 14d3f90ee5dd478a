"""The built wheel carries the config tree: an installed (non-editable) package finds and composes it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import sys
from pathlib import Path
import state, state.config_paths
from state.tx.config.compose import compose_tx_config
from state.emb.config import compose_emb_config
root = Path(sys.argv[1]).resolve()
assert Path(state.__file__).resolve().is_relative_to(root), state.__file__
configs = state.config_paths.configs_dir().resolve()
assert configs == root / "state" / "configs", configs
cfg = compose_tx_config(["model=state_sm"])
assert cfg.model.kwargs.transformer_backbone_kwargs.hidden_size == 672
assert compose_emb_config(None, []).embeddings.current == "esm2-cellxgene"
print("OK", configs)
"""


def test_wheel_ships_configs_and_composes_outside_the_checkout(tmp_path):
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (pip install hatchling)")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("state-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"state/configs/config.yaml", "state/configs/state-defaults.yaml",
                "state/configs/model/state.yaml", "state/configs/training/default.yaml"} <= names  # fmt: skip
        unpacked = tmp_path / "unpacked"
        archive.extractall(unpacked)
    env = {**os.environ, "PYTHONPATH": str(unpacked), "PYTHONNOUSERSITE": "1"}
    # Run from an empty folder so that neither the checkout nor an editable install can shadow the wheel.
    check = subprocess.run(
        [sys.executable, "-c", CHECK, str(unpacked)], capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr[-2000:]
    assert check.stdout.startswith("OK")
