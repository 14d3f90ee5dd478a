"""`state emb fit`: training, arc-state checkpoint layout, resume, bad input, CPU DDP (spec §1.1, §4)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

from state.cli import run
from state.config_paths import configs_dir
from state.emb.data.synthetic import make_se_corpus
from state.emb.lightning_module import StateEmbeddingModel
from state.emb.preprocess import preprocess
from state.io.safe_load import safe_torch_load

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "emb" / "se_tiny"
RUN = "exp_toy_layers_2_dmodel_32_samples_32_max_lr_0.001_op_dim_32"
# A model and run small enough for a few seconds of CPU (the data has 88 training cells).
TINY = [
    "embeddings.current=toy", "dataset.current=toy", "experiment.name=toy", "wandb.enable=false",
    "model.batch_size=8", "model.emsize=32", "model.d_hid=64", "model.nhead=4", "model.nlayers=2",
    "model.output_dim=32", "dataset.pad_length=32", "dataset.P=8", "dataset.N=8", "dataset.S=8",
    "dataset.num_train_workers=0", "dataset.num_val_workers=0", "experiment.num_epochs=1",
    "experiment.val_check_interval=5", "experiment.limit_val_batches=2",
    "experiment.checkpoint.every_n_train_steps=5", "experiment.checkpoint.save_top_k=1",
    "optimizer.gradient_accumulation_steps=2", "optimizer.max_lr=0.001",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic corpus, its preprocess profile and a --conf file = packaged defaults + profile."""
    root = tmp_path_factory.mktemp("emb_fit")
    corpus = make_se_corpus(root / "corpus", seed=1)
    conf = root / "conf.yaml"
    shutil.copy(configs_dir() / "state-defaults.yaml", conf)
    preprocess(profile_name="toy", train_csv=corpus.train_csv, val_csv=corpus.val_csv,
               output_dir=root / "profile", config_file=conf, all_embeddings=corpus.gene_embeddings)
    return root, conf, corpus


def _fit(conf: Path, ckpt: Path, *extra: str) -> int:
    return run(["emb", "fit", "--conf", str(conf), *TINY, f"experiment.checkpoint.path={ckpt}", *extra])


@pytest.fixture(scope="module")
def trained(setup):
    root, conf, _ = setup
    ckpt = root / "ckpt"
    assert _fit(conf, ckpt) == 0
    return ckpt


def test_fit_writes_checkpoints_named_like_arc_state(trained):
    run_dir = trained / "toy"
    names = sorted(p.name for p in run_dir.glob("*.ckpt"))
    assert "last.ckpt" in names
    assert any(n.startswith(f"{RUN}-epoch=0-step=") for n in names)
    assert (trained / f"{RUN}_final.pt").is_file()
    metrics = pd.read_csv(next(run_dir.glob("csv_logs/version_*/metrics.csv")))
    assert {"trainer/train_loss", "validation/val_loss", "trainer/dataset_loss"} <= set(metrics.columns)
    assert np.isfinite(metrics["trainer/train_loss"].dropna()).all()


def test_checkpoint_matches_fixture_layout_and_is_plain_data(trained, setup):
    ours = torch.load(trained / "toy" / "last.ckpt", weights_only=True)  # no pickled classes
    theirs = safe_torch_load(FIXTURE / "model" / "last.ckpt")
    assert list(ours["state_dict"]) == list(theirs["state_dict"])
    assert list(ours["hyper_parameters"]) == list(theirs["hyper_parameters"])
    assert set(ours) == set(theirs)
    hp = ours["hyper_parameters"]
    assert (hp["token_dim"], hp["emb_size"], hp["d_model"], hp["nlayers"]) == (16, 16, 32, 2)
    assert hp["collater"] is None and hp["cfg"]["embeddings"]["current"] == "toy"
    assert yaml.safe_load(ours["cfg_yaml"])["dataset"]["current"] == "toy"
    genes = torch.load(setup[2].gene_embeddings)
    assert list(ours["protein_embeds_dict"]) == list(genes)
    assert torch.equal(ours["state_dict"]["pe_embedding.weight"], torch.stack(list(genes.values())))
    assert ours["optimizer_states"][0]["param_groups"][0]["params"] == list(range(66))  # as arc-state


def test_inference_loader_loads_our_checkpoint(trained, setup):
    from state.emb.checkpoint import load_se_model

    loaded = load_se_model(checkpoint=trained / "toy" / "last.ckpt", device="cpu")
    model = StateEmbeddingModel.from_checkpoint(trained / "toy" / "last.ckpt", dropout=0.0).eval()
    ids = torch.randint(0, 120, (3, 32))
    counts = torch.rand(3, 32)
    with torch.no_grad():
        expected = model.net(ids, counts)
        assert torch.allclose(loaded.model(ids, counts), expected, atol=1e-6)
    assert expected.shape == (3, 42)


def test_fit_resumes_from_last_checkpoint_and_reports_dropped_genes(trained, setup, tmp_path, state_log):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    first = torch.load(tmp_path / "toy" / "last.ckpt", weights_only=True)
    assert _fit(setup[1], tmp_path, "experiment.num_epochs=2") == 0
    second = torch.load(tmp_path / "toy" / "last.ckpt", weights_only=True)
    assert (first["epoch"], second["epoch"]) == (0, 1)
    assert second["global_step"] == 2 * first["global_step"] > 0
    assert "resuming from" in state_log.text
    assert "train_0: 4 of 94" in state_log.text  # genes without an embedding: counted, then dropped


# Run as `python -c` with the CLI's arguments: `state emb fit`, except that the process is killed
# (SIGKILL, nothing cleans up) once half of last.ckpt's bytes are on disk.
_KILLED_MID_SAVE = """
import io, os, signal, sys
from pathlib import Path
import torch
from state.training.checkpoint_io import AtomicCheckpointIO

def write_half_of_last_then_die(self, checkpoint, fh):
    if not Path(fh.name).name.startswith(".last.ckpt."):
        return torch.save(checkpoint, fh)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

AtomicCheckpointIO.write_checkpoint = write_half_of_last_then_die
from state.cli import run
sys.exit(run(sys.argv[1:]))
"""


def test_killed_checkpoint_write_keeps_the_previous_last_ckpt(trained, setup, tmp_path, state_log):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    before = torch.load(tmp_path / "toy" / "last.ckpt", weights_only=True)
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "STATE_PROGRESS": "0"}
    cmd = [sys.executable, "-c", _KILLED_MID_SAVE, "emb", "fit", "--conf", str(setup[1]), *TINY,
           f"experiment.checkpoint.path={tmp_path}", "experiment.num_epochs=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    strays = [p.name for p in (tmp_path / "toy").iterdir() if p.name.startswith(".last.ckpt.")]
    assert len(strays) == 1 and strays[0].endswith(".tmp")  # the half-written bytes went to a temporary name
    survivor = torch.load(tmp_path / "toy" / "last.ckpt", weights_only=True)  # still a whole checkpoint
    assert survivor["global_step"] == before["global_step"]
    assert torch.equal(survivor["state_dict"]["encoder.0.weight"], before["state_dict"]["encoder.0.weight"])

    assert _fit(setup[1], tmp_path, "experiment.num_epochs=2") == 0  # resumes from it, clears the stray
    assert "removed unfinished checkpoint write" in state_log.text
    assert not [p.name for p in (tmp_path / "toy").iterdir() if p.name.endswith(".tmp")]
    after = torch.load(tmp_path / "toy" / "last.ckpt", weights_only=True)
    assert (after["epoch"], after["global_step"]) == (1, 2 * before["global_step"])


def _mapping_without_genes(setup, tmp_path) -> str:
    root = setup[0]
    mapping = torch.load(root / "profile" / "ds_emb_mapping_toy.torch")
    mapping["train_1"] = torch.full_like(mapping["train_1"], -1)
    torch.save(mapping, tmp_path / "mapping.torch")
    return f"embeddings.toy.ds_emb_mapping={tmp_path / 'mapping.torch'}"


def _csv_with_missing_h5ad(setup, tmp_path) -> str:
    table = pd.read_csv(setup[0] / "profile" / "train_toy.csv")
    table.loc[0, "path"] = str(tmp_path / "gone.h5ad")
    table.to_csv(tmp_path / "train.csv", index=False)
    return f"dataset.toy.train={tmp_path / 'train.csv'}"


@pytest.mark.parametrize(
    ("make_override", "message"),
    [
        (lambda s, t: "embeddings.current=null", "embeddings.current is not set"),
        (lambda s, t: "dataset.current=null", "dataset.current is not set"),
        (lambda s, t: f"embeddings.toy.all_embeddings={t / 'nope.pt'}", "nope.pt"),
        (lambda s, t: f"embeddings.toy.ds_emb_mapping={t / 'nope.torch'}", "nope.torch"),
        (_csv_with_missing_h5ad, "missing h5ad file(s): train_0 ->"),
        (_mapping_without_genes, "dataset train_1"),
    ],
    ids=["no-embeddings-current", "no-dataset-current", "no-embeddings-file", "no-mapping-file",
         "missing-h5ad", "no-usable-genes"],
)
def test_bad_input_is_one_line_exit_2(setup, tmp_path, capsys, make_override, message):
    code = _fit(setup[1], tmp_path / "ckpt", make_override(setup, tmp_path))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in "\n".join(lines)
    assert not (tmp_path / "ckpt").exists()


def _write_shard(path: Path, n_cells: int, n_genes: int, rng: np.random.Generator) -> None:
    counts = rng.poisson(rng.gamma(0.6, 3.0, (n_cells, n_genes))).astype(np.float32)
    counts[:, 0] += 40
    ad.AnnData(sp.csr_matrix(counts)).write_h5ad(path)


def test_fixture_checkpoint_continues_training(tmp_path):
    """arc-state's se_tiny last.ckpt: every trainable parameter gets a gradient, and `fit` resumes from it
    with arc-state's own profile files (training shards regenerated with the profile's gene counts)."""
    model = StateEmbeddingModel.from_checkpoint(FIXTURE / "model" / "last.ckpt").train()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 200, (4, 64), generator=g), torch.randint(0, 200, (4, 48), generator=g),
             torch.rand(4, 48, generator=g) * 3, torch.arange(4), torch.rand(4, 8), None, None,
             torch.rand(4, 64, generator=g), torch.tensor([0, 1, 2, 1]))
    result = model._shared_step(batch, training=True)
    (result["loss"] + result["dataset_loss"]).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 65
    assert [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0] == []

    rng = np.random.default_rng(0)
    profile = FIXTURE / "profile"
    rows = {}
    for split, shards in (("train", {"se_train_a": 188, "se_train_b": 180}), ("val", {"se_val": 190})):
        for name, n_genes in shards.items():
            _write_shard(tmp_path / f"{name}.h5ad", 24, n_genes, rng)
        rows[split] = tmp_path / f"{split}.csv"
        pd.DataFrame([{"species": "human", "path": str(tmp_path / f"{n}.h5ad"), "names": n, "num_cells": 24,
                       "num_genes": g} for n, g in shards.items()]).to_csv(rows[split], index=False)
    run_dir = tmp_path / "ckpt" / "se_tiny"
    run_dir.mkdir(parents=True)
    shutil.copy(FIXTURE / "model" / "last.ckpt", run_dir / "last.ckpt")
    code = run(["emb", "fit", "--conf", str(profile / "se_config.yaml"),
                "embeddings.current=synth", "dataset.current=synth", "experiment.name=se_tiny",
                f"embeddings.synth.all_embeddings={profile / 'all_embeddings_synth.pt'}",
                f"embeddings.synth.ds_emb_mapping={profile / 'ds_emb_mapping_synth.torch'}",
                f"embeddings.synth.valid_genes_masks={profile / 'valid_genes_masks_synth.torch'}",
                f"dataset.synth.train={rows['train']}", f"dataset.synth.val={rows['val']}",
                f"experiment.checkpoint.path={tmp_path / 'ckpt'}", "experiment.num_epochs=3",
                "experiment.val_check_interval=3", "experiment.limit_val_batches=1", "wandb.enable=false",
                "experiment.checkpoint.every_n_train_steps=3",
                "model.batch_size=16", "model.emsize=32", "model.d_hid=64", "model.nhead=4", "model.nlayers=2",
                "model.output_dim=32", "dataset.pad_length=64", "dataset.P=16", "dataset.N=16", "dataset.S=16",
                "dataset.num_train_workers=0", "dataset.num_val_workers=0",
                "optimizer.gradient_accumulation_steps=1", "optimizer.max_lr=0.001"])
    assert code == 0
    assert sorted(p.name for p in run_dir.glob("*.ckpt"))[-1] == "last.ckpt"  # overwritten, no last-v1
    resumed = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] > 80
    assert resumed["hyper_parameters"]["cfg"]["dataset"]["current"] == "synth"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fit_ddp_two_cpu_processes(setup, tmp_path):
    """devices=2 on CPU: two DDP processes (gloo, chosen by Lightning), one shared checkpoint."""
    _, conf, _ = setup
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "STATE_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "state", "emb", "fit", "--conf", str(conf), *TINY,
           f"experiment.checkpoint.path={tmp_path}", "experiment.num_gpus_per_node=2",
           f"experiment.port={_free_port()}", "optimizer.gradient_accumulation_steps=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es) (gloo, cpu)" in proc.stderr
    last = torch.load(tmp_path / "toy" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # 88 cells over 2 ranks of batch 8 -> 6 steps per rank


def test_wandb_failure_is_not_fatal(monkeypatch, tmp_path, state_log):
    import lightning.pytorch.loggers as pl_loggers
    from omegaconf import OmegaConf

    from state.emb.fit import _loggers

    class BrokenWandb:
        def __init__(self, **kwargs):
            raise RuntimeError("wandb: network unreachable")

    monkeypatch.setattr(pl_loggers, "WandbLogger", BrokenWandb)
    monkeypatch.setenv("WANDB_MODE", "offline")  # tests run with W&B disabled; offline needs no login
    cfg = OmegaConf.create({"wandb": {"enable": True, "project": "p"}, "experiment": {"name": "x"}})
    loggers = _loggers(cfg, tmp_path)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
    assert "wandb logging disabled: wandb: network unreachable" in state_log.text
    cfg.wandb.enable = False
    assert len(_loggers(cfg, tmp_path)) == 1


def test_second_fit_on_a_busy_checkpoint_folder_refuses_in_one_line(setup, tmp_path, capsys):
    """Two jobs, one checkpoint folder: the second names the first (host, pid, start) and writes nothing."""
    import json
    import time

    from state.training.runlock import LOCK_FILE

    _, conf, _ = setup
    folder = tmp_path / "ckpt" / "toy"
    folder.mkdir(parents=True)
    other = os.getppid()
    (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": other,
                                                "started": "2026-12-07T01:02:03+00:00", "heartbeat": time.time()}))
    assert _fit(conf, tmp_path / "ckpt") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and f"pid {other}" in err[0] and "2026-12-07T01:02:03" in err[0] and "in use" in err[0]
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]


def test_sigusr1_stops_at_the_next_step_with_last_ckpt_and_the_rerun_continues(setup, tmp_path):
    import signal

    import lightning.pytorch as pl

    from state.emb.config import compose_emb_config
    from state.emb.fit import fit
    from state.training.preemption import RunPreempted

    class SignalAtStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    _, conf, _ = setup
    overrides = [*TINY, f"experiment.checkpoint.path={tmp_path}", "experiment.checkpoint.every_n_train_steps=100"]
    with pytest.raises(RunPreempted) as info:
        fit(compose_emb_config(str(conf), overrides), extra_callbacks=[SignalAtStep()])
    assert info.value.exit_code == 138 and info.value.step == 2
    assert safe_torch_load(tmp_path / "toy" / "last.ckpt")["global_step"] == 2
    assert not (tmp_path / f"{RUN}_final.pt").exists()
    whole_overrides = [*TINY, f"experiment.checkpoint.path={tmp_path / 'whole'}",
                       "experiment.checkpoint.every_n_train_steps=100"]
    whole = fit(compose_emb_config(str(conf), whole_overrides))
    resumed = fit(compose_emb_config(str(conf), overrides))
    assert resumed.global_step == whole.global_step > 2
    assert resumed.final_checkpoint is not None
