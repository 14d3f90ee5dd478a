"""``state emb fit``: SE pretraining.

``fit(cfg)`` is a pure function of the composed config (used by the CLI, tests and benchmarks).
It runs on CPU, one GPU, or many GPUs / nodes through Lightning: ``experiment.num_gpus_per_node``
-> devices, ``experiment.num_nodes`` -> num_nodes, DDP when more than one process (Lightning picks
gloo on CPU, nccl on CUDA). Checkpoints go to ``<checkpoint.path>/<experiment.name>/`` as
``<run_name>-epoch=E-step=S.ckpt`` plus ``last.ckpt``; a run resumes from ``last.ckpt`` when it
exists, and ``<checkpoint.path>/<run_name>_final.pt`` is written at the end. Every checkpoint is
written atomically, and the Trainer, its loggers and its checkpoint IO come from :mod:`state.training`.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig

from state.emb.callbacks import GradientEMA, SEFlopsMonitor
from state.emb.data.datamodule import SEDataModule
from state.emb.data.profile import dataset_profile, embedding_profile, load_training_profile
from state.emb.lightning_module import StateEmbeddingModel, warmup_steps_for
from state.io.safe_load import placeholder_to_plain
from state.training.checkpoint_io import AtomicCheckpointIO, remove_stale_temp_files
from state.training.loggers import make_wandb_logger
from state.training.runlock import RunDirLock
from state.training.trainer import TrainerSetup, build_trainer, fit_or_stop, strategy_for
from state.utils.errors import StateError
from state.utils.logging import global_rank

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    checkpoint_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    final_checkpoint: Path | None
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)


def run_name(cfg) -> str:
    """arc-state's run name, the stem of every checkpoint file."""
    return (
        f"exp_{cfg.experiment.name}_layers_{cfg.model.nlayers}_dmodel_{cfg.model.emsize}"
        f"_samples_{cfg.dataset.pad_length}_max_lr_{cfg.optimizer.max_lr}_op_dim_{cfg.model.output_dim}"
    )


def checkpoint_dir(cfg) -> Path:
    return Path(str(cfg.experiment.checkpoint.path)) / str(cfg.experiment.name)


def fit(cfg: DictConfig, *, extra_callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train (or resume training) the SE model described by ``cfg``.

    ``extra_callbacks`` are added to the trainer's (benchmarks use it for timing).
    """
    cfg = cfg.copy()
    embedding_profile(cfg)  # clear errors for unset embeddings.current / dataset.current
    dataset_profile(cfg)
    exp = cfg.experiment
    # experiment.port, unless a launcher (torchrun, SLURM scripts) already chose the rendezvous port.
    os.environ.setdefault("MASTER_PORT", str(exp.get("port", 12400)))
    if "SLURM_JOB_ID" in os.environ:
        os.environ["SLURM_NTASKS_PER_NODE"] = str(exp.num_gpus_per_node)
    L.seed_everything(int(cfg.dataset.get("seed", 42)), workers=True, verbose=False)

    profile = load_training_profile(cfg)
    _check_num_datasets(cfg, profile)
    data = SEDataModule(cfg, profile)
    model = build_model(cfg, profile.gene_embeddings)

    ckpt_dir = checkpoint_dir(cfg)
    name = run_name(cfg)
    final = Path(str(exp.checkpoint.path)) / f"{name}_final.pt"
    checkpointing = _checkpoint_callback(exp, ckpt_dir, name)
    callbacks: list[Callback] = [checkpointing, *extra_callbacks]
    if cfg.optimizer.get("reset_lr_on_restart", False):
        callbacks.append(ResetLearningRate(float(cfg.optimizer.max_lr)))
    if cfg.model.get("ema", False):
        callbacks.append(GradientEMA(float(cfg.model.get("ema_decay", 0.999))))
    if exp.get("cumulative_flops_use_backward") is not None or exp.get("mfu_kwargs"):
        # cumulative_flops always (arc-state 0.11.1); MFU with +experiment.mfu_kwargs.available_flops=<peak FLOP/s>
        mfu = exp.get("mfu_kwargs")
        callbacks.append(SEFlopsMonitor(use_backward=bool(exp.get("cumulative_flops_use_backward", True)),
                                        mfu_kwargs=dict(mfu) if mfu else None))
    trainer = _trainer(cfg, ckpt_dir, callbacks, train_cells=len(data.train_dataset))
    if global_rank() == 0:
        RunDirLock(ckpt_dir).check_free()  # before removing what a killed save left behind
    fit_or_stop(trainer, model, datamodule=data, ckpt_path=_resume_point(ckpt_dir, final))
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "single process"
    log.info("trained %d steps on %d process(es) (%s, %s)", trainer.global_step, trainer.world_size,
             backend, trainer.strategy.root_device)

    trainer.save_checkpoint(final, weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    best = checkpointing.best_model_path or None
    last = ckpt_dir / "last.ckpt"
    return FitResult(
        checkpoint_dir=ckpt_dir,
        last_checkpoint=last if last.is_file() else None,
        best_checkpoint=Path(best) if best else None,
        final_checkpoint=final if final.is_file() else None,
        global_step=int(trainer.global_step),
        metrics=metrics,
    )


def _checkpoint_callback(exp: DictConfig, ckpt_dir: Path, name: str) -> ModelCheckpoint:
    """arc-state's checkpoint files: ``<run_name>-epoch=E-step=S.ckpt`` (top k) and ``last.ckpt``."""
    return ModelCheckpoint(
        dirpath=ckpt_dir,
        filename=f"{name}-{{epoch}}-{{step}}",
        save_last=True,
        save_top_k=int(exp.checkpoint.get("save_top_k", 2)),
        # Without validation batches there is no validation metric to rank checkpoints by.
        monitor=exp.checkpoint.get("monitor", "validation/val_loss") if _validates(exp) else None,
        every_n_train_steps=int(exp.checkpoint.get("every_n_train_steps", 1000)),
        # Always overwrite last.ckpt (never last-v1.ckpt): resuming looks for exactly that name.
        enable_version_counter=False,
    )


def _trainer(cfg: DictConfig, ckpt_dir: Path, callbacks: list[Callback], *, train_cells: int) -> L.Trainer:
    exp = cfg.experiment
    devices, num_nodes = int(exp.num_gpus_per_node), int(exp.get("num_nodes", 1))
    world = devices * num_nodes
    profiler_cfg = exp.get("profile", {}) or {}
    max_steps = int(profiler_cfg.get("max_steps", -1)) if profiler_cfg.get("enable_profiler", False) else -1
    accumulate = int(cfg.optimizer.gradient_accumulation_steps)
    train_batches = _batches_per_epoch(train_cells, int(cfg.model.batch_size), world)
    val_interval = int(exp.get("val_check_interval", 1000)) * world  # arc-state scales it by the world size
    if val_interval > train_batches:
        log.info("experiment.val_check_interval x world size (%d) exceeds the %d batches of an epoch: "
                 "validating once per epoch", val_interval, train_batches)
        val_interval = train_batches
    setup = TrainerSetup(
        root_dir=ckpt_dir,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy_for("auto", processes=world, timeout_s=int(exp.get("ddp_timeout", 3600))),
        precision=None,  # the automatic choice: bf16-mixed (16-mixed) on GPUs, as arc-state; 32-true on CPU
        loggers=_loggers(cfg, ckpt_dir),
        callbacks=callbacks,
        checkpoint_io=SECheckpointIO(),
        step_progress_bar=False,
        last_checkpoint=ckpt_dir / "last.ckpt",
        lock_dir=ckpt_dir,
        lock_what="checkpoint folder",
    )
    return build_trainer(
        setup,
        max_epochs=int(exp.num_epochs),
        max_steps=max_steps,
        gradient_clip_val=float(cfg.optimizer.max_grad_norm),
        accumulate_grad_batches=accumulate,
        val_check_interval=val_interval,
        log_every_n_steps=max(1, min(50, train_batches // accumulate)),
        limit_val_batches=exp.get("limit_val_batches", 1.0),
    )


def _resume_point(ckpt_dir: Path, final: Path) -> Path | None:
    """``last.ckpt`` when it exists; first, rank 0 removes what a killed save left behind."""
    if global_rank() == 0:
        remove_stale_temp_files(ckpt_dir)
        remove_stale_temp_files(final.parent, f".{glob.escape(final.name)}.*.tmp")
    last = ckpt_dir / "last.ckpt"
    if not last.is_file():
        return None
    log.info("resuming from %s", last)
    return last


def build_model(cfg: DictConfig, gene_embeddings: dict[str, torch.Tensor]) -> StateEmbeddingModel:
    """The LightningModule with arc-state's constructor arguments and the frozen gene table."""
    width = int(next(iter(gene_embeddings.values())).numel())
    model = StateEmbeddingModel(
        token_dim=width,
        d_model=int(cfg.model.emsize),
        nhead=int(cfg.model.nhead),
        d_hid=int(cfg.model.d_hid),
        nlayers=int(cfg.model.nlayers),
        output_dim=int(cfg.model.output_dim),
        dropout=float(cfg.model.dropout),
        warmup_steps=warmup_steps_for(cfg),
        compiled=False,
        max_lr=float(cfg.optimizer.max_lr),
        emb_size=width,
        cfg=cfg,
        collater=None,
    )
    model.set_gene_embeddings(gene_embeddings)
    return model


def _check_num_datasets(cfg: DictConfig, profile) -> None:
    data = cfg.dataset[cfg.dataset.current]
    needed = max(len(profile.train_entries), len(profile.val_entries))
    if data.get("num_datasets") is None:
        data.num_datasets = len(profile.train_entries) + len(profile.val_entries)
        log.info("dataset.%s.num_datasets not set; using %d", cfg.dataset.current, data.num_datasets)
    if int(data.num_datasets) < needed:
        raise StateError(
            f"dataset.{cfg.dataset.current}.num_datasets={data.num_datasets} but a split lists {needed} datasets",
            hint=f"set dataset.{cfg.dataset.current}.num_datasets={needed} or more",
        )


def _validates(exp) -> bool:
    limit = exp.get("limit_val_batches", 1.0)
    return limit is None or float(limit) > 0


def _batches_per_epoch(cells: int, batch_size: int, world: int) -> int:
    per_rank = -(-cells // max(world, 1))
    return max(-(-per_rank // batch_size), 1)


def _loggers(cfg: DictConfig, ckpt_dir: Path) -> list[Logger]:
    """``csv_logs/version_N/metrics.csv`` always; W&B with ``wandb.enable`` when it is usable (never fatal)."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(ckpt_dir), name="csv_logs")]
    wandb_cfg = cfg.get("wandb", {}) or {}
    if wandb_cfg.get("enable", False):
        wandb_logger = make_wandb_logger(
            run_name=str(cfg.experiment.name), project=str(wandb_cfg.get("project", "vci")),
            switch="wandb.enable", csv_file="csv_logs/",
        )
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    return loggers


class ResetLearningRate(Callback):
    """``optimizer.reset_lr_on_restart``: back to ``max_lr`` when a run resumes."""

    def __init__(self, max_lr: float) -> None:
        self.max_lr = max_lr

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.max_lr


class SECheckpointIO(AtomicCheckpointIO):
    """Atomic saves; resumes from any SE checkpoint (ours or arc-state's) through the restricted unpickler."""

    def __init__(self) -> None:
        super().__init__(what="SE checkpoint")

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(path, map_location="cpu")
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            checkpoint["hyper_parameters"] = placeholder_to_plain(hparams)
        return checkpoint
