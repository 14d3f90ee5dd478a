"""Many ranks on CPU (gloo), started as a cluster starts them (issue #21).

- 2 ranks x 2 loader workers (``training.devices=2 training.strategy=ddp``, Lightning starts rank 1),
  SIGTERM to the whole process group mid-epoch: ``last.ckpt``, exit 143, and the rerun resumes to the
  uninterrupted run's loss at every step and to its final weights.
- Two simulated nodes on this machine (``NODE_RANK`` 0 and 1, one rank each, ``MASTER_ADDR=127.0.0.1``)
  started at the same moment, as srun / torchrun start them: a fresh start whose validation loss is the
  single-process loss over the same cells, a resume, ``overwrite=true``, and a folder another job holds
  (every rank refuses at once, none waits for a rendezvous).

Each launch is a process group of its own, so a signal to the group reaches the ranks and their loader
workers and nothing of pytest.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.runs import TINY_STATE
from helpers.synthetic import make_processed_dataset, write_toml
from state.io.safe_load import safe_torch_load
from state.training.launch import DECISION_DIR
from state.training.runlock import LOCK_FILE

# Runs the CLI; with TEST_KILL_GROUP_AT_STEP=k, rank 0 sends SIGTERM to its whole process group (both ranks
# and every loader worker) after optimizer step k, as SLURM does to a job step; with
# TEST_KEEP_VALIDATION_BATCHES=<folder> every rank saves the batches it validates. Lightning starts rank 1 by
# running this same script again, so the callbacks are there on every rank.
DRIVER = """
import os, signal, sys
import lightning.pytorch as pl
from state.__main__ import main
from state.tx.train import run as tx_run

class KillGroupAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.killpg(os.getpgrp(), signal.SIGTERM)

class KeepValidationBatches(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            torch.save(batch, os.path.join(self.folder, f"rank{trainer.global_rank}_{batch_idx}.pt"))

extra = []
if os.environ.get("TEST_KILL_GROUP_AT_STEP"):
    extra.append(KillGroupAt(int(os.environ["TEST_KILL_GROUP_AT_STEP"])))
if os.environ.get("TEST_KEEP_VALIDATION_BATCHES"):
    import torch
    extra.append(KeepValidationBatches(os.environ["TEST_KEEP_VALIDATION_BATCHES"]))
own = tx_run._callbacks
tx_run._callbacks = lambda *a: [*own(*a), *extra]
sys.exit(main(sys.argv[1:]))
"""
LAUNCH_TIMEOUT_S = 300
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "STATE_LAUNCH_ID", "STATE_LAUNCH_DECISION", "TORCHELASTIC_RUN_ID")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from state.tx.data import layout as layouts

    root = tmp_path_factory.mktemp("multirank")
    data = make_processed_dataset(root / "data", n_cells=320, n_genes=30, n_hvgs=12, n_perts=4, seed=0)
    toml = write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")
    layouts.index_toml(toml, keys=["X_hvg"], pert_col="gene", cell_type_key="cell_type", batch_col="gem_group",
                       layout_dir=root / "layout")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    return {"toml": toml, "layout": root / "layout", "driver": driver}


def _args(synth, out: Path, name: str, *, steps: int, val_freq: int, loader: list[str]) -> list[str]:
    return [f"data.kwargs.toml_config_path={synth['toml']}", "data.kwargs.embed_key=X_hvg",
            "data.kwargs.output_space=gene", "data.kwargs.control_pert=non-targeting", "use_wandb=false",
            f"output_dir={out}", f"name={name}", f"training.max_steps={steps}", f"training.val_freq={val_freq}",
            "training.batch_size=2", "+training.log_every_n_steps=1", *loader, *TINY_STATE]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith("SLURM_")}
    env.update({"PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                "STATE_PROGRESS": "0", **extra})
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(synth, args: list[str], logs: Path, envs: list[dict[str, str]]) -> list[tuple[int, str]]:
    """Start one process per entry of ``envs`` at once, all in one new process group; wait for all of them
    (and for everything they started: Lightning's rank 1, the loader workers) and return (exit status, stderr)."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for i, env in enumerate(envs):
        err = (logs / f"proc{i}.err").open("w")
        files.append(err)
        group = {"process_group": procs[0].pid if procs else 0}  # one new group for the launch
        procs.append(subprocess.Popen([sys.executable, str(synth["driver"]), "tx", "train", *args], env=env,
                                      cwd=logs, stdout=subprocess.DEVNULL, stderr=err, **group))
    group_id = procs[0].pid
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
        while time.monotonic() < deadline:  # the group is empty once every rank and worker has exited
            try:
                os.killpg(group_id, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("processes of the launch still run after the launcher's processes ended")
    finally:
        try:
            os.killpg(group_id, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for err in files:
            err.close()
    return [(code, (logs / f"proc{i}.err").read_text()) for i, code in enumerate(codes)]


def _losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "version_0" / "metrics.csv").open() as fh:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(fh) if row.get("train_loss")}


def _val_losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "version_0" / "metrics.csv").open() as fh:
        return {int(row["step"]): float(row["val_loss"]) for row in csv.DictReader(fh) if row.get("val_loss")}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return safe_torch_load(ckpt)["state_dict"]


# ---------------------------------------------------------------- 2 ranks x 2 workers, SIGTERM to the group

STEPS, CHECK_EVERY, KILL_AT = 14, 3, 7  # the ranks agree on the signal at step 9 (the first multiple of 3 after 7)


def test_ddp_two_ranks_two_workers_sigterm_to_the_group_resumes_to_the_same_losses(synth, tmp_path):
    loader = ["data.kwargs.num_workers=2", "data.kwargs.fast_loader=true",
              f"data.kwargs.fast_loader_dir={synth['layout']}", "training.devices=2", "training.strategy=ddp"]
    env = _env(STATE_PREEMPT_CHECK_EVERY=str(CHECK_EVERY))

    [(code, err)] = _launch(synth, _args(synth, tmp_path, "whole", steps=STEPS, val_freq=5, loader=loader),
                            tmp_path / "logs_whole", [env])
    assert code == 0, err[-3000:]
    whole = tmp_path / "whole"
    assert len(safe_torch_load(whole / "checkpoints" / "final.ckpt")["callbacks"]["ExactResume"]["ranks"]) == 2

    cut_args = _args(synth, tmp_path, "cut", steps=STEPS, val_freq=5, loader=loader)
    [(code, err)] = _launch(synth, cut_args, tmp_path / "logs_cut", [_env(**env, TEST_KILL_GROUP_AT_STEP=str(KILL_AT))])
    assert code == 143, err[-3000:]
    assert "killed by signal" not in err and "error: training stopped by SIGTERM after step 9" in err
    cut = tmp_path / "cut"
    last = safe_torch_load(cut / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 * CHECK_EVERY
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_done"] > 0  # mid-epoch
    assert len(last["callbacks"]["ExactResume"]["ranks"]) == 2  # both ranks' random states
    assert not (cut / "checkpoints" / "final.ckpt").exists() and not (cut / LOCK_FILE).exists()

    [(code, err)] = _launch(synth, cut_args, tmp_path / "logs_resume", [env])
    assert code == 0, err[-3000:]
    assert _losses(cut) == _losses(whole) and sorted(_losses(whole)) == list(range(STEPS))
    final_cut, final_whole = _weights(cut / "checkpoints" / "final.ckpt"), _weights(whole / "checkpoints" / "final.ckpt")
    assert all(torch.equal(final_cut[k], final_whole[k]) for k in final_whole)
    assert not (tmp_path / DECISION_DIR).exists()  # rank 0 removed its decision


# ---------------------------------------------------------------- two nodes, one rank each, started at once


def _node_envs(port: int, **extra: str) -> list[dict[str, str]]:
    return [_env(NODE_RANK=str(node), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 **extra) for node in (0, 1)]


NODE_LOADER = ["data.kwargs.num_workers=0", "data.kwargs.fast_loader=false", "training.devices=1",
               "+training.num_nodes=2", "training.strategy=ddp"]


def _single_process_val_loss(ckpt: Path, batches: list[Path]) -> float:
    """The validation loss of ``ckpt`` over ``batches`` in this one process: the mean over all their sets."""
    from state.tx.models import registry

    model = registry.load_model_checkpoint(ckpt)
    total = sets = 0.0
    with torch.no_grad():
        for path in batches:
            batch = torch.load(path, weights_only=False)  # written by this test's driver
            n_sets = len(batch["pert_cell_emb"]) // 8
            total += float(model.validation_step(batch, 0)) * n_sets
            sets += n_sets
    return total / sets
def test_two_nodes_started_at_once_agree_on_start_resume_overwrite_and_refusal(synth, tmp_path):
    run = tmp_path / "nodes"

    # fresh start: both nodes train; the validation loss is that of one process over both ranks' sets
    kept = tmp_path / "val_batches"
    kept.mkdir()
    results = _launch(synth, _args(synth, tmp_path, "nodes", steps=4, val_freq=4, loader=NODE_LOADER),
                      tmp_path / "logs_fresh", _node_envs(_free_port(), TEST_KEEP_VALIDATION_BATCHES=str(kept)))
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert safe_torch_load(run / "checkpoints" / "final.ckpt")["global_step"] == 4
    assert (run / "version_0" / "metrics.csv").is_file() and not (run / LOCK_FILE).exists()
    assert not (tmp_path / DECISION_DIR).exists()
    ranks = {r: sorted(kept.glob(f"rank{r}_*.pt")) for r in (0, 1)}
    assert ranks[0] and ranks[1]  # each rank validated its own share
    ckpt = run / "checkpoints" / "last.ckpt"
    logged = _val_losses(run)[3]
    assert logged == pytest.approx(_single_process_val_loss(ckpt, ranks[0] + ranks[1]), rel=1e-5)
    assert logged != pytest.approx(_single_process_val_loss(ckpt, ranks[0]), rel=1e-5)  # not rank 0's share

    # resume: every rank continues from rank 0's last.ckpt
    results = _launch(synth, _args(synth, tmp_path, "nodes", steps=6, val_freq=4, loader=NODE_LOADER),
                      tmp_path / "logs_resume", _node_envs(_free_port()))
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "resuming from" in results[0][1]
    assert safe_torch_load(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert sorted(_losses(run)) == list(range(6))

    # overwrite=true: rank 0 deletes the folder; the other rank starts afresh with it instead of resuming
    results = _launch(synth, [*_args(synth, tmp_path, "nodes", steps=2, val_freq=4, loader=NODE_LOADER),
                              "overwrite=true"], tmp_path / "logs_overwrite", _node_envs(_free_port()))
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert safe_torch_load(run / "checkpoints" / "final.ckpt")["global_step"] == 2
    assert sorted(_losses(run)) == [0, 1]

    # a folder another live job holds: rank 0 refuses and the other rank says so at once (no rendezvous wait)
    other = os.getppid()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": other, "started": "x",
                                             "heartbeat": time.time()}))
    before = sorted(p.name for p in run.rglob("*"))
    started = time.monotonic()
    results = _launch(synth, [*_args(synth, tmp_path, "nodes", steps=4, val_freq=4, loader=NODE_LOADER),
                              "overwrite=true"], tmp_path / "logs_locked", _node_envs(_free_port()))
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S
    assert [code for code, _ in results] == [2, 2]
    assert f"pid {other}" in results[0][1].strip().splitlines()[-1]
    last_line = results[1][1].strip().splitlines()[-1]
    assert last_line.startswith("error: rank 0 refused to start:") and f"pid {other}" in last_line
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing deleted, nothing written
