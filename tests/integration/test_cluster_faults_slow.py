"""Issue #16, slow variants (``python -m pytest -m slow -s -p no:cacheprovider tests/integration/test_cluster_faults_slow.py``):
many ``kill -9`` trials at random moments of ``tx train``, and long runs whose memory must stay flat:
a 20,000-step ``tx train`` validating every 500 steps, ``emb transform`` and ``tx infer`` on large inputs.

Sizes come from the environment so a cluster can run more: STATE_KILL_TRIALS (default 12),
STATE_LONG_STEPS (default 20000), STATE_LONG_MODEL (default state: the tiny State model of
the fast tests; or another ``model.name``), STATE_LONG_VAL_EVERY (default 500), STATE_LONG_CELLS (cells of the generated inputs, default 300000).
Each test prints its counts and memory (run pytest with ``-s`` to see them). Memory is the resident
set size (RSS): sampled at training steps for ``tx train``, and for the two commands (run as
subprocesses, as a user would) polled from /proc/<pid>/status every 0.2 s; "after warm-up" means
after the first 10% of the steps, or of the command's run time.
"""

from __future__ import annotations

import csv
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from test_cluster_faults import synth, train_args  # noqa: F401  (synth is a fixture; tests/integration is on sys.path)

from state.io.safe_load import safe_torch_load
from state.training.runlock import LOCK_FILE
from state.tx.config.compose import compose_tx_config
from state.tx.train import run as tx_run

pytestmark = pytest.mark.slow
KILL_STEPS = 600  # validation and a checkpoint write every 5 steps: most of the run is steps, validations and writes


def _cli(args: list[str], cwd: Path, stderr: Any = subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "state", "--log-quiet", "tx", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _check_checkpoints_load(run_dir: Path) -> int:
    loaded = 0
    for ckpt in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        assert isinstance(safe_torch_load(ckpt)["global_step"], int), ckpt
        loaded += 1
    return loaded


def test_kill_9_at_random_moments_never_leaves_an_unloadable_checkpoint(synth, tmp_path):  # noqa: F811
    trials = int(os.environ.get("STATE_KILL_TRIALS", "12"))
    rng = random.Random(16)
    # The kill moments are drawn within the wall time of an uninterrupted run on this machine, so
    # (almost) every kill lands during start-up, a step, a validation or a checkpoint write, however
    # fast or loaded the machine is.
    calibration = tmp_path / "calibration"
    started, first_write = time.monotonic(), None
    err_log = tmp_path / "calibration.err"
    with err_log.open("w") as err:  # a file, not a pipe: nobody reads while polling, so a pipe could fill
        whole = _cli(train_args(synth, calibration, "whole", steps=KILL_STEPS, val_freq=5), calibration.parent,
                     stderr=err)
        while whole.poll() is None and time.monotonic() - started < 600:  # when checkpoints start: end of start-up
            if first_write is None and any((calibration / "whole" / "checkpoints").glob("*.ckpt")):
                first_write = time.monotonic() - started
            time.sleep(0.05)
    assert whole.wait(timeout=5) == 0, err_log.read_text()[-2000:]
    err_log.unlink()
    wall = time.monotonic() - started
    first_write = first_write or 0.5 * wall
    shutil.rmtree(calibration)
    killed = resumed = loaded = in_training = 0
    for trial in range(trials):
        name = f"trial{trial}"
        args = train_args(synth, tmp_path, name, steps=KILL_STEPS, val_freq=5)
        job = _cli(args, tmp_path)
        # three kills in four during training (steps, validations, checkpoint writes), the rest in start-up
        low = 0.3 * first_write if trial % 4 == 3 else 0.9 * first_write
        time.sleep(rng.uniform(low, 0.95 * wall))
        if job.poll() is None:
            job.send_signal(signal.SIGKILL)
            killed += 1
        job.wait()
        run_dir = tmp_path / name
        if run_dir.is_dir():
            in_training += (run_dir / "checkpoints" / "last.ckpt").is_file()
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
    print(f"\nkill -9 trials: {trials} (an uninterrupted run takes {wall:.0f} s, its "
          f"first checkpoint after {first_write:.0f} s), killed mid-run: {killed} "
          f"({in_training} after training had written a checkpoint), "
          f"resumed to the end: {resumed}, checkpoints loaded: {loaded}, unloadable: 0")
    assert killed >= 0.75 * trials, "most kills came after the run had finished: nothing was tested"


class RssProbe(pl.Callback):
    """Resident memory (max RSS is monotone, so sample the current RSS from /proc) every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every, self.samples = every, []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step % self.every == 0:
            with open("/proc/self/statm") as fh:
                pages = int(fh.read().split()[1])
            self.samples.append((trainer.global_step, pages * resource.getpagesize()))


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_long_training_keeps_memory_flat_and_metrics_complete(synth, tmp_path, monkeypatch):  # noqa: F811
    """20,000 steps (about 1,500 epochs of the tiny data), validation every 500: RSS flat, every row in metrics.csv."""
    steps = int(os.environ.get("STATE_LONG_STEPS", "20000"))
    val_every = int(os.environ.get("STATE_LONG_VAL_EVERY", 500 if steps >= 2000 else max(steps // 40, 1)))
    probe = RssProbe(every=max(steps // 200, 1))
    own = tx_run._callbacks
    monkeypatch.setattr(tx_run, "_callbacks", lambda *a: [*own(*a), probe])
    model = os.environ.get("STATE_LONG_MODEL", "state")  # the tiny State model, or another model.name
    args = train_args(synth, tmp_path, "long", steps=steps, val_freq=val_every, log_every=50,
                      **({} if model == "state" else {"model": [f"model={model}"]}))
    started = time.monotonic()
    result = tx_run.train(compose_tx_config(args))
    wall = time.monotonic() - started
    assert result.global_step == steps
    warm = [rss for step, rss in probe.samples if step >= steps // 10]
    growth = (max(warm) - warm[0]) / warm[0]
    with (result.run_dir / "version_0" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    train_steps = sorted(int(r["step"]) for r in rows if r.get("train_loss"))
    val_steps = sorted(int(r["step"]) for r in rows if r.get("val_loss"))
    print(f"\nlong tx train (model={model}): {steps} steps in {wall:.0f} s, validation every {val_every}; RSS after warm-up "
          f"(step {steps // 10}) {_mib(warm[0])}, at the end {_mib(warm[-1])}, max {_mib(max(warm))} "
          f"(growth {growth:.1%}); metrics.csv: {len(train_steps)} train rows, {len(val_steps)} validation rows")
    assert growth < 0.05
    assert train_steps == list(range(49, steps, 50))  # one row per logging interval, none lost or doubled
    assert val_steps == list(range(val_every - 1, steps, val_every))  # every validation, at its step


# ------------------------------------------------------------------ long commands on large inputs

LONG_CELLS = int(os.environ.get("STATE_LONG_CELLS", "300000"))
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"


class RssPoller:
    """Polls a process's VmRSS (/proc/<pid>/status) every ``every_s`` seconds in a thread: (seconds, bytes)."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        import threading

        self.pid, self.every_s, self.samples = pid, every_s, []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
            if kib:  # a zombie has no VmRSS
                self.samples.append((time.monotonic() - self._start, kib * 1024))
            self._done.wait(self.every_s)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def report(self, warm_fraction: float = 0.1) -> dict[str, float]:
        """RSS at the end of warm-up, at the end and at most afterwards, and the growth after warm-up."""
        end = self.samples[-1][0]
        after = [rss for t, rss in self.samples if t >= warm_fraction * end]
        deciles = [next(rss for t, rss in self.samples if t >= k / 10 * end) for k in range(11)]
        return {"wall_s": end, "warm": after[0], "end": after[-1], "max": max(after), "peak": max(r for _, r in self.samples),
                "growth": (max(after) - after[0]) / after[0], "samples": len(self.samples),
                "deciles": " ".join(f"{d / 2**20:.0f}" for d in deciles)}


def _run_polled(args: list[str], cwd: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "state", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    poller = RssPoller(job.pid)
    _, err = job.communicate(timeout=3600)
    poller.stop()
    assert job.returncode == 0, err[-3000:]
    return poller.report()


def _tiled(source: Path, n_cells: int, dest: Path, *, noise_seed: int = 0) -> Path:
    """``source``'s cells repeated to ``n_cells`` (CSR X, obsm kept), with a little noise so no two rows are equal."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    small = ad.read_h5ad(source)
    rows = np.resize(np.arange(small.n_obs), n_cells)
    x = sp.csr_matrix(small.X)[rows].astype(np.float32)
    rng = np.random.default_rng(noise_seed)
    x.data = x.data * rng.uniform(0.9, 1.1, x.data.size).astype(np.float32)
    big = ad.AnnData(X=x, obs=small.obs.iloc[rows].reset_index(drop=True), var=small.var.copy())
    big.obs_names = [f"c{i}" for i in range(n_cells)]
    for key, values in small.obsm.items():
        big.obsm[key] = np.asarray(values)[rows] * rng.uniform(0.9, 1.1, (n_cells, 1)).astype(np.float32)
    big.uns.update({k: v for k, v in small.uns.items() if k in ("log1p", "hvg")})
    big.write_h5ad(dest)
    return dest


def _print_rss(what: str, n_cells: int, rss: dict[str, float], out: Path) -> None:
    print(f"\nlong {what}: {n_cells} cells in {rss['wall_s']:.0f} s; RSS after warm-up {_mib(rss['warm'])}, "
          f"at the end {_mib(rss['end'])}, max after warm-up {_mib(rss['max'])} (growth {rss['growth']:.1%}), "
          f"peak {_mib(rss['peak'])}; {rss['samples']} samples; output {_mib(out.stat().st_size)}; "
          f"RSS MiB at each tenth of the run: {rss['deciles']}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_long_emb_transform_streams_with_flat_memory(tmp_path):
    model = FIXTURES / "emb" / "se_tiny" / "model"
    big = _tiled(FIXTURES / "emb" / "se_tiny" / "input.h5ad", LONG_CELLS, tmp_path / "big.h5ad")
    out = tmp_path / "embedded.h5ad"
    rss = _run_polled(["--log-quiet", "emb", "transform", "--model-folder", str(model), "--input", str(big),
                       "--output", str(out)], tmp_path)
    _print_rss("emb transform", LONG_CELLS, rss, out)
    assert rss["growth"] < 0.05


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_long_tx_infer_keeps_memory_flat(tmp_path, monkeypatch):
    """``tx infer`` reads its input whole (as arc-state does) and allocates the prediction array at the
    first set: its memory is input + output, by design. What must stay flat is the prediction loop over
    the sets: RSS sampled at every predictor call, growth after the first tenth of the calls < 5%."""
    from state.io.columns import ColumnChoices
    from state.tx.infer import predictor as predictor_module
    from state.tx.infer.run import run_infer

    run = FIXTURES / "tx" / "state_llama" / "run"
    big = _tiled(FIXTURES / "tx" / "state_llama" / "infer_input.h5ad", LONG_CELLS, tmp_path / "big.h5ad")
    out = tmp_path / "simulated.h5ad"
    samples: list[int] = []
    own = predictor_module.SetPredictor.predict_sets

    def sampled(self, **kwargs):
        samples.append(_rss_now())
        return own(self, **kwargs)

    monkeypatch.setattr(predictor_module.SetPredictor, "predict_sets", sampled)
    before, started = _rss_now(), time.monotonic()
    run_infer(model_dir=run, adata_path=big, output=out, columns=ColumnChoices(pert_col="gene", embed_key="X_hvg"),
              seed=42, quiet=True, unknown_as_control=True)
    wall = time.monotonic() - started
    warm = samples[len(samples) // 10:]
    growth = (max(warm) - warm[0]) / warm[0]
    print(f"\nlong tx infer: {LONG_CELLS} cells in {wall:.0f} s, {len(samples)} predictor calls; RSS before "
          f"{_mib(before)}, at the first call {_mib(samples[0])} (input read), after a tenth of the calls "
          f"{_mib(warm[0])} (prediction array allocated), at the last call {_mib(warm[-1])}, max {_mib(max(warm))} "
          f"(growth {growth:.1%}); output {_mib(out.stat().st_size)}")
    assert len(samples) >= 20
    assert growth < 0.05
