"""bench/gpu_smoke.sh --dry-run: every section runs on CPU and lands in the one report (so the GPU script cannot rot)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("environment", "attention", "loss", "loader", "e2e", "sync", "sigterm", "emb_transform")


def test_dry_run_reports_every_section(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "2"}  # no --report: $OUT/gpu_smoke.md
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--dry-run", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_smoke.md"]  # one report, nothing else
    text = (out / "gpu_smoke.md").read_text()
    for name in SECTIONS:
        assert f"\n## {name}\n" in text, name
    results = json.loads(text.split("```json")[1].split("```")[0])["results"]
    assert not [name for name, r in results.items() if "error" in r or "skipped" in r]

    assert {row["kernel"] for row in results["attention"]["rows"]} <= {"math", "flash (cpu)"}
    bf16 = {row["loss"]: row["max_rel_error"] for row in results["loss"]["rows"] if row["mode"] == "bf16"}
    assert bf16["guarded"] < 1e-3 < bf16["unguarded"]
    assert all(row["cells_per_s"] > 0 for row in results["loader"]["rows"])
    assert {row["precision"] for row in results["e2e"]["rows"]} == {"32-true", "bf16-mixed"}
    assert all(row["exit"] == 0 and row["steps_per_s"] > 0 for row in results["e2e"]["rows"])
    assert results["sync"]["exit"] == 0
    assert isinstance(results["sigterm"]["exit_code"], int) and "last_ckpt" in results["sigterm"]
    assert results["emb_transform"]["cells"] == 32 and results["emb_transform"]["cells_per_s_excluding_load"] > 0


def test_without_a_gpu_the_full_run_refuses_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():  # the full run would start: nothing to check here
        pytest.skip("a GPU is present")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--report", str(tmp_path / "r.md")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and not (tmp_path / "r.md").exists()
