"""What a shared cluster does to a training run (issue #16), fast variants on CPU: preemption signals
and exact resume, a second job on a busy run directory, full disks. The many-trial kill tests and the
long runs are in test_cluster_faults_slow.py (marked slow)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest

from helpers.runs import TINY_STATE
from helpers.synthetic import make_processed_dataset, write_toml
from state.cli import run as cli_run
from state.io.safe_load import safe_torch_load
from state.training.runlock import LOCK_FILE
from state.tx.config.compose import compose_tx_config
from state.tx.train import run as tx_run


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_processed_dataset(root / "data", n_cells=240, n_genes=40, n_hvgs=16, n_perts=4, seed=0)
    return write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")


def train_args(toml: Path, out: Path, name: str, *, steps: int, model: list[str] = TINY_STATE, val_freq: int = 4,
               log_every: int = 1) -> list[str]:
    """A tiny run that logs every step and validates every 4 (an epoch of this data is 13 steps)."""
    return [f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene",
            "data.kwargs.num_workers=0", "data.kwargs.control_pert=non-targeting", "use_wandb=false",
            f"output_dir={out}", f"name={name}", f"training.max_steps={steps}", f"training.val_freq={val_freq}",
            "training.batch_size=2", f"+training.log_every_n_steps={log_every}", *model]


class SignalAtStep(pl.Callback):
    """Sends ``signum`` to this process when training reaches ``step`` (as a scheduler would)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def signal_at(monkeypatch, step: int, signum: int) -> None:
    own = tx_run._callbacks
    monkeypatch.setattr(tx_run, "_callbacks", lambda *a: [*own(*a), SignalAtStep(step, signum)])


def train_losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "version_0" / "metrics.csv").open() as fh:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(fh) if row.get("train_loss")}


STEPS = 9


@pytest.fixture(scope="module")
def whole_run(synth, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run's loss at every step."""
    out = tmp_path_factory.mktemp("whole")
    result = tx_run.train(compose_tx_config(train_args(synth, out, "whole", steps=STEPS)))
    assert result.global_step == STEPS
    return train_losses(result.run_dir)


@pytest.mark.parametrize(("signum", "stop_step"), [(signal.SIGTERM, 4), (signal.SIGUSR1, 6)])
def test_preempted_run_resumes_with_the_uninterrupted_loss_curve(synth, whole_run, tmp_path, monkeypatch, capsys,
                                                                 signum, stop_step):
    """SIGTERM at a validation step (the checkpoint waits for validation) or SIGUSR1 mid-way: exit 128+N with
    last.ckpt at that step, no final.ckpt; the rerun continues so that every step's loss is the same."""
    steps = STEPS
    signal_at(monkeypatch, stop_step, signum)
    code = cli_run(["tx", "train", *train_args(synth, tmp_path, "cut", steps=steps)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 128 + signum
    assert err[-1].startswith("error: training stopped by") and signal.Signals(signum).name in err[-1]
    cut = tmp_path / "cut"
    assert safe_torch_load(cut / "checkpoints" / "last.ckpt")["global_step"] == stop_step
    assert not (cut / "checkpoints" / "final.ckpt").exists() and not (cut / LOCK_FILE).exists()
    monkeypatch.undo()

    resumed = tx_run.train(compose_tx_config(train_args(synth, tmp_path, "cut", steps=steps)))
    assert resumed.resumed_from is not None and resumed.global_step == steps
    expected, got = whole_run, train_losses(cut)
    assert sorted(expected) == sorted(got) == list(range(steps))
    assert got == expected  # same value at every step, before and after the interruption


def test_exit_status_is_configurable(synth, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STATE_PREEMPT_EXIT_CODE", "99")
    signal_at(monkeypatch, 1, signal.SIGUSR1)
    code = cli_run(["tx", "train", *train_args(synth, tmp_path, "run", steps=3)])
    assert code == 99 and "SIGUSR1 after step 1" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # handlers are given back


def fake_slurm_batch_job(monkeypatch, tmp_path: Path, *, job_id: str = "4242", watch: Path | None = None) -> Path:
    """A SLURM batch job as Lightning sees it (one task, auto-requeue on) and a fake ``scontrol`` first on
    PATH; returns the file where scontrol records each call (its arguments, and whether ``watch`` existed)."""
    calls, bin_dir = tmp_path / "scontrol_calls.txt", tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    seen = f'$( [ -f "{watch}" ] && echo present || echo absent )' if watch else "-"
    scontrol.write_text(f'#!/bin/sh\necho "$* {seen}" >> "{calls}"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": job_id, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
                       "SLURM_JOB_NAME": "batchjob", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    return calls


def test_slurm_batch_job_on_sigusr1_requeues_after_last_ckpt_and_the_requeued_job_finishes(
        synth, whole_run, tmp_path, monkeypatch, capsys):
    """`#SBATCH --signal=SIGUSR1@90 --requeue` simulated: Lightning detects SLURM and arms its auto-requeue;
    `scontrol requeue <job>` runs once, after last.ckpt is on disk (no mid-step hpc_ckpt); exit 138; the same
    command in the requeued job resumes at that step and reproduces the uninterrupted loss curve."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    last = tmp_path / "job" / "checkpoints" / "last.ckpt"
    calls = fake_slurm_batch_job(monkeypatch, tmp_path, watch=last)
    assert SLURMEnvironment.detect()
    args = ["tx", "train", *train_args(synth, tmp_path, "job", steps=STEPS)]
    signal_at(monkeypatch, 5, signal.SIGUSR1)
    code = cli_run(args)
    assert code == 138, capsys.readouterr().err[-3000:]
    assert calls.read_text().splitlines() == ["requeue 4242 present"]
    assert safe_torch_load(last)["global_step"] == 5
    assert not list((tmp_path / "job").rglob("hpc_ckpt_*")) and not (last.parent / "final.ckpt").exists()
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)

    monkeypatch.setattr(tx_run, "_callbacks", _own_callbacks)  # the requeued job: same command, no signal
    assert cli_run(args) == 0
    assert calls.read_text().splitlines() == ["requeue 4242 present"]  # no second requeue
    assert safe_torch_load(last.parent / "final.ckpt")["global_step"] == STEPS
    assert train_losses(tmp_path / "job") == whole_run


_own_callbacks = tx_run._callbacks


def _foreign_lock(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    other = os.getppid()
    (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": other,
                                                "started": "2026-12-07T01:02:03+00:00", "heartbeat": time.time()}))
    return other


def test_second_tx_train_on_a_busy_run_dir_refuses_and_touches_nothing(synth, tmp_path, capsys):
    other = _foreign_lock(tmp_path / "busy")
    code = cli_run(["tx", "train", *train_args(synth, tmp_path, "busy", steps=2), "overwrite=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"pid {other}" in err[0] and socket.gethostname() in err[0] and "2026-12-07T01:02:03" in err[0]
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [LOCK_FILE]  # overwrite=true deleted nothing


def test_stale_lock_of_a_killed_tx_train_is_taken_over(synth, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x",
                                                 "heartbeat": time.time()}))
    result = tx_run.train(compose_tx_config(train_args(synth, tmp_path, "stale", steps=1,
                                                       model=["model=perturb_mean"])))
    assert result.global_step >= 1 and not (run_dir / LOCK_FILE).exists()


# ------------------------------------------------------------------ full disk / quota / file-size limit

FSIZE_CHILD = """
import resource, signal, sys, torch
from state.training.checkpoint_io import AtomicCheckpointIO
from state.utils.errors import StateError
target = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10)}, target)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit raises EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(500_000)}, target)
except StateError as exc:
    print(exc.one_line())
"""


def test_checkpoint_write_past_the_file_size_limit_is_refused_cleanly(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(target)], capture_output=True, text=True,
                          env=env, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-2000:]
    assert str(target) in lines[0] and "file size limit" in lines[0]
    assert "needs 1.9 MiB" in lines[0] and "free there" in lines[0]  # 500,000 float32 + a little
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left
    assert safe_torch_load(target)["w"].numel() == 10  # the previous checkpoint still loads


def test_tx_train_on_a_full_disk_says_which_file_and_keeps_the_last_checkpoint(synth, tmp_path, monkeypatch, capsys):
    import errno

    from state.training import checkpoint_io

    base = train_args(synth, tmp_path, "full", steps=4)
    assert cli_run(["tx", "train", *base]) == 0
    capsys.readouterr()
    last = tmp_path / "full" / "checkpoints" / "last.ckpt"

    def disk_full(self, checkpoint, fh):
        fh.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.AtomicCheckpointIO, "write_checkpoint", disk_full)
    code = cli_run(["tx", "train", *train_args(synth, tmp_path, "full", steps=8)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1, err
    assert f"cannot write {last.parent}/" in err[0] and ".ckpt:" in err[0] and "no space left" in err[0] and "it needs" in err[0] and "free there" in err[0]
    assert safe_torch_load(last)["global_step"] == 4
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "full" / LOCK_FILE).exists()  # the lock is released on failure too


# ------------------------------------------------------------------ read-only inputs and model folders

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"


def _read_only_copy(source: Path, dest: Path) -> dict[str, float]:
    """Copy ``source`` to ``dest``, make it read-only (files 0444, folders 0555); return its listing."""
    import shutil

    shutil.copytree(source, dest)
    for path in sorted(dest.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    dest.chmod(0o555)
    return _listing(dest)


def _listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def _writable_again(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize("command", ["tx infer", "emb transform"])
def test_commands_read_read_only_models_and_inputs_and_write_nothing_next_to_them(tmp_path, command):
    """Checkpoints shared read-only on a cluster: the command works and writes only its --output.
    (Tests may run as root, which ignores permissions: the listings prove nothing was written.)"""
    from state.__main__ import main

    if command == "tx infer":
        model = FIXTURES / "tx" / "state_llama" / "run"
        inputs = FIXTURES / "tx" / "state_llama" / "infer_input.h5ad"
        flags = ["--pert-col", "gene", "--embed-key", "X_hvg", "--seed", "42", "--quiet", "--unknown-as-control"]
        model_flag = "--model-dir"
    else:
        model = FIXTURES / "emb" / "se_tiny" / "model"
        inputs = FIXTURES / "emb" / "se_tiny" / "input_det.h5ad"
        flags, model_flag = [], "--model-folder"
    if not model.is_dir():
        pytest.skip("fixture not copied")
    ro_model, ro_input = tmp_path / "ro" / "model", tmp_path / "ro_in" / "input"
    before = {"model": _read_only_copy(model, ro_model), "input": _read_only_copy(inputs.parent, ro_input)}
    out = tmp_path / "out" / "result.h5ad"
    input_flag = "--adata" if command == "tx infer" else "--input"
    try:
        code = main([*command.split(), model_flag, str(ro_model), input_flag, str(ro_input / inputs.name),
                     "--output", str(out), *flags])
        after = {"model": _listing(ro_model), "input": _listing(ro_input)}
    finally:
        _writable_again(tmp_path / "ro")
        _writable_again(tmp_path / "ro_in")
    assert code == 0 and out.is_file()
    assert after == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.h5ad"]


def test_tx_predict_of_a_read_only_run_writes_only_its_eval_dir(synth, tmp_path):  # noqa: F811
    """A run folder shared read-only: ``--eval-dir`` puts the results elsewhere; neither the run nor the
    training data gains a file (the listings prove it, also as root)."""
    assert cli_run(["tx", "train", *train_args(synth, tmp_path / "runs", "shared", steps=4)]) == 0
    data_before = _listing(synth.parent)
    ro_run = tmp_path / "ro" / "shared"
    before = _read_only_copy(tmp_path / "runs" / "shared", ro_run)
    out = tmp_path / "mine" / "eval"
    try:
        code = cli_run(["tx", "predict", "--output-dir", str(ro_run), "--checkpoint", "final.ckpt",
                        "--eval-dir", str(out)])
        after = _listing(ro_run)
    finally:
        _writable_again(tmp_path / "ro")
    assert code == 0
    assert after == before and _listing(synth.parent) == data_before
    assert (out / "adata_pred.h5ad").is_file() and any(out.glob("*_results.csv"))


# ------------------------------------------------------------------ emb fit: exact resume, SLURM requeue


class BatchLosses(pl.Callback):
    """Every training batch's loss by (epoch, batch index); sends ``signum`` after batch ``at`` = (epoch, index)."""

    def __init__(self, at: tuple[int, int] | None = None, signum: int = signal.SIGTERM) -> None:
        self.losses: dict[tuple[int, int], float] = {}
        self.at, self.signum = at, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[(trainer.current_epoch, batch_idx)] = float(outputs["loss"])
        if (trainer.current_epoch, batch_idx) == self.at:
            os.kill(os.getpid(), self.signum)


def _emb_overrides(ckpt: Path) -> list[str]:
    # 88 training cells in batches of 8: 11 batches, 6 optimizer steps (2 batches each) per epoch; dropout 0.1.
    from test_emb_fit import TINY

    return [*TINY, f"experiment.checkpoint.path={ckpt}", "experiment.checkpoint.every_n_train_steps=100",
            "experiment.num_epochs=2"]


@pytest.fixture(scope="module")
def emb_setup(tmp_path_factory):
    from test_emb_fit import setup

    return setup.__wrapped__(tmp_path_factory)


@pytest.fixture(scope="module")
def emb_whole_run(emb_setup, tmp_path_factory) -> dict[tuple[int, int], float]:
    from state.emb.config import compose_emb_config
    from state.emb.fit import fit

    record = BatchLosses()
    result = fit(compose_emb_config(str(emb_setup[1]), _emb_overrides(tmp_path_factory.mktemp("emb_whole"))),
                 extra_callbacks=[record])
    assert result.global_step == 12 and len(record.losses) == 22
    return record.losses


def test_emb_fit_preempted_mid_accumulation_resumes_with_the_uninterrupted_losses(emb_setup, emb_whole_run, tmp_path):
    """SIGTERM after the first half of an accumulated step in epoch 2: training stops after that step, and the
    resumed run (the same epoch order, the same per-batch gene draws and dropout) gives every batch's loss exactly."""
    from state.emb.config import compose_emb_config
    from state.emb.fit import fit
    from state.training.preemption import RunPreempted

    overrides = _emb_overrides(tmp_path)
    cut = BatchLosses(at=(1, 4))  # epoch 2, batch 5: the first half of the epoch's third optimizer step
    with pytest.raises(RunPreempted) as stopped:
        fit(compose_emb_config(str(emb_setup[1]), overrides), extra_callbacks=[cut])
    assert stopped.value.step == 9 and max(cut.losses) == (1, 5)  # waited for the batch that completes step 9
    assert safe_torch_load(tmp_path / "toy" / "last.ckpt")["global_step"] == 9
    rest = BatchLosses()
    assert fit(compose_emb_config(str(emb_setup[1]), overrides), extra_callbacks=[rest]).global_step == 12
    assert min(rest.losses) == (1, 6) and not set(rest.losses) & set(cut.losses)
    assert {**cut.losses, **rest.losses} == emb_whole_run


def test_emb_fit_in_a_slurm_batch_job_requeues_after_last_ckpt(emb_setup, tmp_path, monkeypatch, capsys):
    """`state emb fit` under SLURM: SIGUSR1 -> last.ckpt, one `scontrol requeue`, exit 138; the requeued job finishes."""
    from state.emb import fit as emb_fit

    folder = tmp_path / "ckpt" / "toy"
    calls = fake_slurm_batch_job(monkeypatch, tmp_path, job_id="777", watch=folder / "last.ckpt")
    plain_fit = emb_fit.fit
    monkeypatch.setattr(emb_fit, "fit", lambda cfg: plain_fit(cfg, extra_callbacks=[BatchLosses(at=(0, 5), signum=signal.SIGUSR1)]))
    args = ["emb", "fit", "--conf", str(emb_setup[1]), *_emb_overrides(tmp_path / "ckpt")]
    assert cli_run(args) == 138, capsys.readouterr().err[-3000:]
    assert "SIGUSR1 after step 3" in capsys.readouterr().err
    assert calls.read_text().splitlines() == ["requeue 777 present"]
    assert safe_torch_load(folder / "last.ckpt")["global_step"] == 3 and not list(tmp_path.rglob("hpc_ckpt_*"))
    monkeypatch.setattr(emb_fit, "fit", plain_fit)
    assert cli_run(args) == 0
    assert calls.read_text().splitlines() == ["requeue 777 present"]
    assert safe_torch_load(folder / "last.ckpt")["global_step"] == 12


# ------------------------------------------------------------------ a signal to every process, loader workers too


class SignalEveryoneAt(pl.Callback):
    """After optimizer step ``step``: ``signum`` to this process's DataLoader workers, then to this process, as
    SLURM's signal to the whole job step reaches them (in-process, so pytest itself is not signalled)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum, self.workers = step, signum, 0

    def on_train_batch_end(self, trainer, *args) -> None:
        import multiprocessing

        if trainer.global_step == self.step:
            import subprocess

            workers = [p for p in multiprocessing.active_children() if p.is_alive()]
            self.workers = len(workers)
            # Sent by another process, as slurmstepd sends it (PyTorch's workers treat their parent's SIGTERM
            # as a request to leave quietly).
            subprocess.run(["kill", "-s", signal.Signals(self.signum).name[3:], *(str(p.pid) for p in workers)],
                           check=True)
            time.sleep(0.5)  # the workers have received it before the training process decides
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_tx_train_on_cell_load_with_workers_stops_cleanly_when_the_workers_get_the_signal_too(
        synth, tmp_path, monkeypatch, capsys, signum):
    """cell-load's loader, 2 workers: the workers ignore the signal, the run writes last.ckpt and exits 128+N
    (without the workers' handling: "DataLoader worker ... exited unexpectedly", exit 1)."""
    args = [a for a in train_args(synth, tmp_path, "workers", steps=8) if not a.startswith("data.kwargs.num_workers")]
    everyone = SignalEveryoneAt(3, signum)
    own = tx_run._callbacks
    monkeypatch.setattr(tx_run, "_callbacks", lambda *a: [*own(*a), everyone])
    code = cli_run(["tx", "train", *args, "data.kwargs.num_workers=2", "data.kwargs.fast_loader=false"])
    err = capsys.readouterr().err
    assert everyone.workers >= 2  # the training loader's workers (and validation's) got the signal
    assert code == 128 + signum, err[-3000:]
    assert safe_torch_load(tmp_path / "workers" / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_emb_fit_with_workers_stops_cleanly_when_the_workers_get_the_signal_too(emb_setup, tmp_path, signum):
    from state.emb.config import compose_emb_config
    from state.emb.fit import fit
    from state.training.preemption import RunPreempted

    everyone = SignalEveryoneAt(2, signum)
    overrides = [*_emb_overrides(tmp_path), "dataset.num_train_workers=2"]
    with pytest.raises(RunPreempted) as stopped:
        fit(compose_emb_config(str(emb_setup[1]), overrides), extra_callbacks=[everyone])
    assert everyone.workers >= 2 and stopped.value.exit_code == 128 + signum and stopped.value.step == 2
    assert safe_torch_load(tmp_path / "toy" / "last.ckpt")["global_step"] == 2
