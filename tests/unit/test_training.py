"""The training layer both `tx train` and `emb fit` build on (state.training): checkpoint files,
loggers, precision / strategy policy and Trainer assembly. No training here."""

from __future__ import annotations

import datetime
import os
import stat

import pytest
import torch
from omegaconf import OmegaConf

from state.emb.config import compose_emb_config
from state.emb.fit import SECheckpointIO, _resume_point
from state.emb.fit import _loggers as emb_loggers
from state.emb.fit import _trainer as emb_trainer
from state.training.checkpoint_io import AtomicCheckpointIO
from state.training.loggers import make_wandb_logger
from state.training.trainer import TrainerSetup, build_trainer, precision_for, strategy_for
from state.utils.errors import StateError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_checkpoint_files_get_the_permissions_of_a_plain_write(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    plain = tmp_path / "plain.ckpt"
    torch.save({"global_step": 1}, plain)
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~_umask()


# ------------------------------------------------------------------ checkpoint files (what emb fit now gets)


class _DiesHalfwayIO(AtomicCheckpointIO):
    """Writes half of the checkpoint, then fails the way an interrupted process does."""

    def write_checkpoint(self, checkpoint, fh):
        fh.write(b"\x80" * 100)
        fh.flush()
        raise KeyboardInterrupt("simulated crash")


def test_se_checkpoint_io_writes_atomically_and_reads_arc_state_configs_as_plain_data(tmp_path):
    target = tmp_path / "last.ckpt"
    SECheckpointIO().save_checkpoint({"global_step": 3, "hyper_parameters": {"cfg": {"a": 1}}}, target)
    with pytest.raises(KeyboardInterrupt):
        _DiesHalfwayIO().save_checkpoint({"global_step": 5}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    loaded = SECheckpointIO().load_checkpoint(target)
    assert loaded["global_step"] == 3 and loaded["hyper_parameters"] == {"cfg": {"a": 1}}
    with pytest.raises(StateError, match="SE checkpoint"):
        SECheckpointIO().load_checkpoint(tmp_path / "gone.ckpt")


def test_emb_resume_clears_its_own_unfinished_writes_only(tmp_path, caplog):
    ckpt_dir = tmp_path / "toy"
    ckpt_dir.mkdir()
    final = tmp_path / "run_a_final.pt"
    for name in ("toy/.last.ckpt.x1.tmp", "toy/.run_a-epoch=0-step=5.ckpt.x2.tmp", ".run_a_final.pt.x3.tmp",
                 ".run_b_final.pt.x4.tmp", "toy/last.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level("INFO", logger="state"):
        assert _resume_point(ckpt_dir, final) == ckpt_dir / "last.ckpt"
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == [".run_b_final.pt.x4.tmp", "toy/last.ckpt"]  # another run's final write is not ours
    assert "resuming from" in caplog.text
    (ckpt_dir / "last.ckpt").unlink()
    assert _resume_point(ckpt_dir, final) is None


# ------------------------------------------------------------------ W&B guards (tx's, now also emb's)


def _emb_cfg(**wandb):
    return OmegaConf.create({"wandb": {"enable": True, "project": "p", **wandb}, "experiment": {"name": "x"}})


def test_emb_wandb_disabled_or_not_logged_in_keeps_csv_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with caplog.at_level("WARNING", logger="state"):
        assert [type(lg).__name__ for lg in emb_loggers(_emb_cfg(), tmp_path)] == ["CSVLogger"]
    assert "wandb.enable=true but WANDB_MODE=disabled: logging to csv_logs/ only" in caplog.text
    caplog.clear()
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level("WARNING", logger="state"):
        assert len(emb_loggers(_emb_cfg(), tmp_path)) == 1
    assert "not logged in" in caplog.text and "wandb.enable=false" in caplog.text


class _FakeRun:
    def __init__(self):
        self.config = {}
        self.path = "team/p/abc123"


class _FlakyWandb:
    """Stands in for Lightning's WandbLogger: starts fine, then loses the network."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.experiment = _FakeRun()
        self.experiment.config = _Recorder()
        self.calls = 0

    def log_metrics(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionError("network unreachable")


class _Recorder(dict):
    def update(self, values, **kwargs):
        super().update(values)


def test_wandb_failing_mid_run_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    import lightning.pytorch.loggers as pl_loggers

    monkeypatch.setattr(pl_loggers, "WandbLogger", _FlakyWandb)
    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers = emb_loggers(_emb_cfg(project="vci"), tmp_path)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "SafeWandbLogger"]
    wandb = loggers[1]
    assert (wandb.kwargs["name"], wandb.kwargs["project"]) == ("x", "vci")
    assert wandb.experiment.config == {} and not (tmp_path / "wandb_path.txt").exists()  # emb: nothing extra
    with caplog.at_level("WARNING", logger="state"):
        wandb.log_metrics({"loss": 1.0}, step=1)
        wandb.log_metrics({"loss": 0.5}, step=2)
    assert wandb.calls == 1 and caplog.text.count("W&B logging failed") == 1

    tx_logger = make_wandb_logger(run_name="r", project="p", config={"lr": 1}, run_dir=tmp_path)
    assert tx_logger.experiment.config == {"lr": 1}
    assert (tmp_path / "wandb_path.txt").read_text() == "team/p/abc123\n"


# ------------------------------------------------------------------ precision, strategy, Trainer assembly


def test_precision_policy(monkeypatch):
    assert precision_for("bf16-mixed") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_for(None) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision_for(None) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision_for(None) == "16-mixed"


def test_strategy_policy():
    from lightning.pytorch.strategies import DDPStrategy

    from state.training.trainer import StateDDPStrategy, buffers_need_sync, process_count

    assert strategy_for("auto", find_unused_parameters=True) == "auto"
    assert strategy_for("deepspeed", processes=8) == "deepspeed"
    for requested, processes in (("ddp", 1), ("auto", 2)):  # auto over several processes is ddp, same handling
        ddp = strategy_for(requested, processes=processes, find_unused_parameters=True)
        assert isinstance(ddp, StateDDPStrategy) and ddp._ddp_kwargs.get("find_unused_parameters") is True
    ddp = strategy_for("ddp", timeout_s=120)
    assert isinstance(ddp, DDPStrategy) and ddp._timeout == datetime.timedelta(seconds=120)
    assert ddp._ddp_kwargs.get("find_unused_parameters") is False
    assert process_count(2) == 2 and process_count([0, 1, 2], 2) == 6 and process_count("0,1") == 2
    assert process_count("1", 2) == 2 and process_count(1) == 1
    assert not buffers_need_sync(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
    assert buffers_need_sync(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))


@pytest.mark.parametrize(("progress", "step_bar", "bar"), [("1", True, "StateProgressBar"),
                                                           ("1", False, "lightning"), ("0", True, None)])
def test_trainer_gets_the_layer_progress_bar_and_checkpoint_io(tmp_path, monkeypatch, progress, step_bar, bar):
    from lightning.pytorch.callbacks import ProgressBar

    monkeypatch.setenv("STATE_PROGRESS", progress)
    io = AtomicCheckpointIO()
    trainer = build_trainer(TrainerSetup(root_dir=tmp_path, step_progress_bar=step_bar, checkpoint_io=io),
                            max_steps=1)
    bars = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, ProgressBar)]
    if bar == "lightning":  # emb keeps Lightning's own per-epoch bar (Rich or tqdm, whichever is installed)
        assert len(bars) == 1 and bars[0] in ("RichProgressBar", "TQDMProgressBar")
    else:
        assert bars == ([bar] if bar else [])
    assert trainer.strategy.checkpoint_io is io and trainer.default_root_dir == str(tmp_path)


def test_emb_trainer_keeps_its_settings_through_the_layer(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_emb_config(None, ["wandb.enable=false", "experiment.num_gpus_per_node=2",
                                    "experiment.ddp_timeout=60", "experiment.num_epochs=3"])
    trainer = emb_trainer(cfg, tmp_path, [], train_cells=10_000)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.strategy._timeout.total_seconds() == 60
    assert isinstance(trainer.strategy.checkpoint_io, SECheckpointIO)
    assert trainer.precision == "32-true" and trainer.max_epochs == 3 and trainer.num_devices == 2
    assert [type(lg).__name__ for lg in trainer.loggers] == ["CSVLogger"]


def test_any_atomic_write_that_runs_out_of_space_names_the_file_and_leaves_nothing(tmp_path):
    import errno

    from state.io.atomic import atomic_write

    target = tmp_path / "out.h5ad"
    target.write_bytes(b"old")

    def fills_the_disk(tmp):
        tmp.write_bytes(b"x" * 4096)
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    with pytest.raises(StateError) as info:
        atomic_write(target, fills_the_disk)
    message = info.value.one_line()
    assert str(target) in message and "quota" in message and "at least 4.0 KiB" in message and "free there" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"] and target.read_bytes() == b"old"
    with pytest.raises(OSError, match="Permission"):  # other failures pass through unchanged
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
