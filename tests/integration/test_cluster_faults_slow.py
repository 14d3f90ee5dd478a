"""Issue #16, slow variants (``python -m pytest -m slow -p no:cacheprovider tests/integration/test_cluster_faults_slow.py``):
many ``kill -9`` trials at random moments of ``tx train``, and a long run whose memory must stay flat.

Sizes come from the environment so a cluster can run more: STATE_KILL_TRIALS (default 12),
STATE_LONG_STEPS (default 20000). Each test prints its counts (run pytest with ``-s`` to see them).
"""

from __future__ import annotations

import csv
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from test_cluster_faults import synth, train_args  # noqa: F401  (synth is a fixture; tests/integration is on sys.path)

from state.io.safe_load import safe_torch_load
from state.training.runlock import LOCK_FILE
from state.tx.config.compose import compose_tx_config
from state.tx.train import run as tx_run

pytestmark = pytest.mark.slow
KILL_STEPS = 60


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "state", "--log-quiet", "tx", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _check_checkpoints_load(run_dir: Path) -> int:
    loaded = 0
    for ckpt in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        assert isinstance(safe_torch_load(ckpt)["global_step"], int), ckpt
        loaded += 1
    return loaded


def test_kill_9_at_random_moments_never_leaves_an_unloadable_checkpoint(synth, tmp_path):  # noqa: F811
    trials = int(os.environ.get("STATE_KILL_TRIALS", "12"))
    rng = random.Random(16)
    killed = resumed = loaded = 0
    for trial in range(trials):
        name = f"trial{trial}"
        args = train_args(synth, tmp_path, name, steps=KILL_STEPS, val_freq=5)
        job = _cli(args, tmp_path)
        time.sleep(rng.uniform(4.0, 25.0))  # start-up, steps, validation or a checkpoint write
        if job.poll() is None:
            job.send_signal(signal.SIGKILL)
            killed += 1
        job.wait()
        run_dir = tmp_path / name
        if run_dir.is_dir():
            loaded += _check_checkpoints_load(run_dir)
        again = _cli(args, tmp_path)
        _, err = again.communicate(timeout=600)
        assert again.returncode == 0, f"trial {trial}: {err[-2000:]}"
        resumed += 1
        final = safe_torch_load(run_dir / "checkpoints" / "final.ckpt")
        assert final["global_step"] == KILL_STEPS
        loaded += _check_checkpoints_load(run_dir)
        assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")], "unfinished writes left behind"
        assert not (run_dir / LOCK_FILE).exists()
        with (run_dir / "version_0" / "metrics.csv").open() as fh:
            steps = [int(row["step"]) for row in csv.DictReader(fh) if row.get("train_loss")]
        assert steps == sorted(steps) and len(steps) == len(set(steps)), "rows of two runs mixed"
    # Every other trial's folder is untouched by this one: each holds only its own run.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(f"trial{i}" for i in range(trials))
    print(f"\nkill -9 trials: {trials}, killed mid-run: {killed}, resumed to the end: {resumed}, "
          f"checkpoints loaded: {loaded}, unloadable: 0")


class RssProbe(pl.Callback):
    """Resident memory (max RSS is monotone, so sample the current RSS from /proc) every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every, self.samples = every, []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step % self.every == 0:
            with open("/proc/self/statm") as fh:
                pages = int(fh.read().split()[1])
            self.samples.append((trainer.global_step, pages * resource.getpagesize()))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_long_training_keeps_memory_flat_and_metrics_complete(synth, tmp_path, monkeypatch):  # noqa: F811
    steps = int(os.environ.get("STATE_LONG_STEPS", "20000"))
    probe = RssProbe(every=max(steps // 40, 1))
    own = tx_run._callbacks
    monkeypatch.setattr(tx_run, "_callbacks", lambda *a: [*own(*a), probe])
    args = train_args(synth, tmp_path, "long", steps=steps, val_freq=max(steps // 40, 1), log_every=50)
    result = tx_run.train(compose_tx_config(args))
    assert result.global_step == steps
    warm = [rss for step, rss in probe.samples if step >= steps // 10]
    growth = (max(warm) - warm[0]) / warm[0]
    with (result.run_dir / "version_0" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    train_steps = sorted({int(r["step"]) for r in rows if r.get("train_loss")})
    val_rows = [r for r in rows if r.get("val_loss")]
    print(f"\nlong run: {steps} steps, RSS after warm-up {warm[0] / 2**20:.0f} MiB -> max {max(warm) / 2**20:.0f} MiB "
          f"({growth:.1%}), {len(train_steps)} train rows, {len(val_rows)} validation rows")
    assert growth < 0.05
    assert train_steps == list(range(49, steps, 50))
    assert len(val_rows) == steps // max(steps // 40, 1)
