"""``state tx train`` as a pure function: ``train(cfg) -> TrainResult``.

Order of work (so that bad input never leaves a half-written run directory behind):
1. check the config, the model name, the TOML and the data files (nothing written yet);
2. seed, build cell-load's data module, read var_dims, build the model (still nothing written);
3. create ``output_dir/name`` (``overwrite=true`` deletes it first; an existing ``last.ckpt`` is
   resumed) and write arc-state's files plus our readable twins;
4. fit with Lightning, then write ``final.ckpt``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from state.tx import combinations, rundir
from state.tx.config.architecture import TransitionConfig, model_set_length
from state.tx.config.validate import validate_tx_config
from state.tx.data import module as tx_data
from state.tx.models import registry
from state.tx.train.memory_guard import check_step_memory
from state.tx.train.resume_check import check_resume_fits
from state.utils.errors import StateError
from state.utils.logging import global_rank
from state.utils.plain import resolved_config

log = logging.getLogger(__name__)

# Training keys this implementation adds to arc-state's config. They are kept out of the model's
# hyper-parameters so checkpoints carry exactly arc-state's keys.
OWN_TRAINING_KEYS = frozenset({"precision", "optimizer"})
CHECKPOINT_NAMES = ("best.ckpt", "last.ckpt", "final.ckpt")


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint_paths: dict[str, Path] = field(default_factory=dict)  # file name -> path, those that exist
    metrics: dict[str, float] = field(default_factory=dict)  # last value of every logged metric
    global_step: int = 0
    resumed_from: Path | None = None


def _validate(cfg: Any) -> None:
    validate_tx_config(cfg)
    missing = [key for key in ("data", "model", "training", "name", "output_dir") if key not in cfg]
    if missing:
        raise StateError(f"the config lacks top-level key(s) {', '.join(missing)}",
                         hint="compose it with `state tx train` or state.tx.config.compose.compose_tx_config")


def set_length(model_cfg: Mapping[str, Any]) -> int:
    """Cells per set for the data loader and the model (the one rule: config.architecture.cells_per_set)."""
    length = model_set_length(model_cfg)
    if length is None:
        raise StateError("cannot tell the cell set length of this model",
                         hint="add +model.kwargs.transformer_backbone_kwargs.n_positions=<cells per set>")
    return length


def _batch_shape(plain: dict[str, Any]) -> tuple[int, int]:
    """(sets per batch, cells per set); a one-set model's ``training.batch_size`` becomes 1 in ``plain``."""
    training, model_name = plain["training"], plain["model"]["name"]
    batch_size = int(training.get("batch_size", 16))
    set_len = set_length(plain["model"])
    if registry.model_entry(model_name).sets_per_batch(batch_size, set_len) != batch_size:
        log.info("training.batch_size=%d -> 1 for %s (cells per step = cell_sentence_len=%d)",
                 batch_size, model_name, set_len)
        batch_size = training["batch_size"] = 1
    return batch_size, set_len


def _build_model(plain: Mapping[str, Any], data_kwargs: Mapping[str, Any], var_dims: Mapping[str, Any]):
    training = {k: v for k, v in plain["training"].items() if k not in OWN_TRAINING_KEYS}
    arch = TransitionConfig.from_model_config(
        plain["model"], var_dims=var_dims, output_space=data_kwargs.get("output_space", "gene"))
    model_kwargs = arch.model_kwargs(plain["model"].get("kwargs") or {})
    try:
        return registry.build_lightning_module(
            plain["model"]["name"], data_kwargs=data_kwargs, model_kwargs=model_kwargs,
            training=training, var_dims=var_dims,
        )
    except StateError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise StateError(f"model '{plain['model']['name']}' cannot be built from model.kwargs: {exc}",
                         hint="check the model.kwargs.* overrides") from exc


def _apply_optimizer_choice(model: Any, training: Mapping[str, Any], model_name: str) -> None:
    """``training.optimizer=adamw``: AdamW with ``training.weight_decay`` (arc-state's Adam has none, and
    its ``weight_decay`` key is inert; decay changes the weights, so it is opt-in)."""
    if training.get("optimizer", "adam") != "adamw":
        return
    if not getattr(model, "honours_optimizer_choice", False):
        raise StateError(f"training.optimizer=adamw does not apply to model '{model_name}': it has its own "
                         "optimizer settings", hint="drop training.optimizer=adamw (this model reads training.wd)")
    model.decoupled_weight_decay = float(training.get("weight_decay") or 0.0)
    log.info("optimizer: AdamW, weight_decay=%g", model.decoupled_weight_decay)


def _apply_init_from(model: Any, init_from: Any, dm: Any, var_dims: Mapping[str, Any],
                     data_kwargs: Mapping[str, Any]) -> None:
    """Fine-tuning start (``model.kwargs.init_from``): the checkpoint's weights, perturbation / gene /
    batch rows mapped by name (:mod:`state.tx.train.init_from`); the rest stay fresh."""
    if not init_from:
        return
    from state.tx.train.init_from import init_from_checkpoint, target_vocabulary

    target = target_vocabulary(dm, var_dims, data_kwargs.get("embed_key"))
    report = init_from_checkpoint(model, init_from, target)
    log.info("%s", report.table())


def _write_run_files(run_dir: Path, cfg: Any, dm: Any, var_dims: Mapping[str, Any]) -> None:
    rundir.write_config(run_dir, cfg)
    rundir.write_data_module_state(run_dir, dm)
    rundir.write_maps(run_dir, dm)
    rundir.write_var_dims(run_dir, var_dims)


def _loggers(plain: Mapping[str, Any], run_dir: Path, resume_step: int | None) -> list:
    from state.training.loggers import RunCSVLogger, make_wandb_logger

    loggers: list = [RunCSVLogger(plain["output_dir"], str(plain["name"]), keep_rows_before_step=resume_step)]
    if plain.get("use_wandb"):
        wb = plain.get("wandb") or {}
        logger = make_wandb_logger(
            run_name=str(plain["name"]), project=wb.get("project", "state"), entity=wb.get("entity"),
            save_dir=wb.get("local_wandb_dir", "./wandb_logs"), tags=list(wb.get("tags") or []),
            config=dict(plain), run_dir=run_dir, switch="use_wandb", csv_file="version_0/metrics.csv",
        )
        if logger is not None:
            loggers.append(logger)
    return loggers


def _callbacks(training: Mapping[str, Any], run_dir: Path, model_name: str) -> list:
    """tx's own callbacks: its checkpoint names, speed logging, and for the State model gradients and FLOPs."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from state.tx.train.callbacks import BatchSpeedMonitor, GradientNormLogger

    callbacks: list = [
        ModelCheckpoint(
            dirpath=run_dir / rundir.CHECKPOINT_DIR, filename="best", monitor="val_loss", mode="min",
            save_top_k=1, save_last=True, every_n_train_steps=_val_freq(training),
        ),
        BatchSpeedMonitor(interval=50),
    ]
    every = _ckpt_every(training)
    if every:
        # last.ckpt on its own step interval (arc-state reads the key but ignores it): a cluster job
        # resumes from at most `every` steps back, however rarely it validates. Weights unaffected.
        callbacks.append(ModelCheckpoint(dirpath=run_dir / rundir.CHECKPOINT_DIR, save_top_k=0, save_last=True,
                                         every_n_train_steps=every))
    if registry.model_entry(model_name).extra_training_logs:
        from state.training.flops import FlopsMonitor

        callbacks.append(GradientNormLogger())
        if "cumulative_flops_use_backward" in training or training.get("use_mfu"):
            callbacks.append(FlopsMonitor(
                use_backward=bool(training.get("cumulative_flops_use_backward", True)),
                mfu_kwargs=training.get("mfu_kwargs") if training.get("use_mfu") else None,
            ))
    return callbacks


def _val_freq(training: Mapping[str, Any]) -> int:
    return int(training.get("val_freq") or 2000)


def _ckpt_every(training: Mapping[str, Any]) -> int | None:
    """The extra last.ckpt interval, or None when off (0 / null) or already that of the val_freq checkpoint."""
    every = int(training.get("ckpt_every_n_steps") or 0)
    return every if every > 0 and every != _val_freq(training) else None


def _trainer(plain: Mapping[str, Any], run_dir: Path, *, max_steps: int, loggers: list, model_name: str,
             strategy: Any):
    from state.training.trainer import TrainerSetup, build_trainer

    training = plain["training"]
    setup = TrainerSetup(
        root_dir=run_dir,
        devices=training.get("devices", 1),
        num_nodes=int(training.get("num_nodes") or 1),  # multi-node: +training.num_nodes=N (Lightning env vars)
        strategy=strategy,
        precision=training.get("precision") or "32-true",
        loggers=loggers,
        callbacks=_callbacks(training, run_dir, model_name),
        last_checkpoint=run_dir / rundir.CHECKPOINT_DIR / "last.ckpt",
        lock_dir=run_dir,
    )
    # Lightning logs every 50 steps by default; short runs would end with no metrics.csv at all.
    log_every = training.get("log_every_n_steps") or min(50, max(1, max_steps))
    return build_trainer(
        setup,
        max_steps=max_steps,
        check_val_every_n_epoch=None,
        val_check_interval=_val_freq(training),
        # A module that steps its own optimizers clips itself (Lightning refuses both at once).
        gradient_clip_val=None if registry.model_entry(model_name).manual_optimization
        else training.get("gradient_clip_val"),
        accumulate_grad_batches=int(training.get("gradient_accumulation_steps") or 1),
        use_distributed_sampler=False,
        enable_model_summary=False,
        log_every_n_steps=int(log_every),
    )


def _strategy(training: Mapping[str, Any], model: Any, dm: Any) -> Any:
    """DDP refuses parameters that get no gradient; the gene decoder gets none when the data carry no
    expression targets (e.g. embed_key=X_hvg with output_space=gene), so let DDP look for unused ones.
    ``strategy: auto`` over several processes is ddp, with the same handling."""
    from state.training.trainer import process_count, strategy_for

    requested = training.get("strategy", "auto")
    processes = process_count(training.get("devices", 1), training.get("num_nodes") or 1)
    decoder_idle = getattr(model, "gene_decoder", None) is not None and not getattr(dm, "store_raw_expression", True)
    strategy = strategy_for(requested, processes=processes, find_unused_parameters=decoder_idle)
    if decoder_idle and not isinstance(strategy, str):
        log.info("strategy %s -> ddp with find_unused_parameters: the gene decoder has no targets in this data",
                 requested)
    return strategy


def _max_steps(plain: Mapping[str, Any]) -> int:
    forced = registry.model_entry(plain["model"]["name"]).forced_max_steps
    return int(forced if forced is not None else plain["training"].get("max_steps", -1))


def _resume_step(path: Path | None) -> int | None:
    if path is None:
        return None
    from state.io.safe_load import safe_torch_load

    ckpt = safe_torch_load(path, what="checkpoint")
    return int(ckpt.get("global_step", 0)) if isinstance(ckpt, dict) else None


def train(cfg: Any) -> TrainResult:
    """Train the model ``cfg`` describes (a composed tx config) and return where everything went."""
    import torch

    # arc-state trains with "medium" float32 matmul precision: on GPUs (TF32) and on CPUs with bf16/AMX
    # units (oneDNN) fp32 matmuls then run ~2x faster at slightly lower precision. Same numerics as
    # arc-state's training; STATE_MATMUL_PRECISION=highest opts out. The setting is process-wide, so
    # it is restored afterwards (predict/infer in the same process keep full fp32).
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(os.environ.get("STATE_MATMUL_PRECISION", "medium"))
    try:
        return _train(cfg)
    finally:
        torch.set_float32_matmul_precision(previous)


def _agreed_plan(plain: Mapping[str, Any]) -> tuple[rundir.RunDirPlan, Any]:
    """What this launch does with ``output_dir/name``: rank 0 decides (start, resume or refuse), the
    other ranks take its decision (:mod:`state.training.launch`); also the decision file, or None."""
    from state.training.launch import decision_for
    from state.training.runlock import RunDirLock
    from state.training.trainer import process_count

    training, rank = plain["training"], global_rank()
    processes = process_count(training.get("devices", 1), training.get("num_nodes") or 1)
    handshake = decision_for(plain["output_dir"], str(plain["name"]), rank=rank, processes=processes)
    if rank != 0:  # a rank other than 0 runs this function too: it must not touch the folder
        decision = handshake.receive(rank=rank)
        return rundir.worker_plan(plain["output_dir"], plain["name"], decision.get("resume_from")), handshake
    if handshake is not None:
        handshake.clear_stale()
    try:
        # Before anything is written (overwrite=true would delete a live job's folder); the Trainer
        # then holds the lock for the whole fit.
        RunDirLock(Path(str(plain["output_dir"])).expanduser() / str(plain["name"])).check_free()
        plan = rundir.plan_run_dir(plain["output_dir"], plain["name"], overwrite=bool(plain.get("overwrite")))
    except StateError as exc:
        if handshake is not None:
            handshake.refuse(exc)
        raise
    if handshake is not None:
        handshake.publish({"resume_from": str(plan.resume_from) if plan.resume_from else None,
                           "overwrite": plan.delete_first})
    return plan, handshake


def _train(cfg: Any) -> TrainResult:
    import lightning.pytorch as pl

    model_name = (cfg.get("model") or {}).get("name")
    registry.model_class(model_name)  # unknown / unimplemented models fail before any other check
    _validate(cfg)
    plain = resolved_config(cfg)
    training = plain["training"]
    is_rank_zero = global_rank() == 0
    data_kwargs = tx_data.effective_data_kwargs(plain["data"].get("kwargs") or {})
    batch_size, set_len = _batch_shape(plain)
    tx_data.check_data_inputs(data_kwargs)
    plan, handshake = _agreed_plan(plain)

    pl.seed_everything(int(training.get("train_seed", 42)), workers=True, verbose=False)
    combos = combinations.settings(plain["model"].get("kwargs"), data_kwargs)
    if combos is not None:  # the model needs the separator to split labels at predict/infer time
        plain["model"].setdefault("kwargs", {})[combinations.SEPARATOR_KEY] = combos.separator
    dm = tx_data.build_data_module(plain["data"].get("name", "PerturbationDataModule"), data_kwargs,
                                   batch_size=batch_size, cell_sentence_len=set_len, combinations=combos)
    var_dims = tx_data.setup_data_module(dm)
    check_step_memory(model_name, plain["model"].get("kwargs") or {}, cells=batch_size * set_len,
                      genes=int(var_dims.get("input_dim") or 0))
    # arc-state builds the training loader once before fit (cell-load's sampler draws from numpy's
    # global RNG when it is built); doing the same keeps the sampled cell sets identical for a seed.
    log.info("training split: %d batches per epoch", len(dm.train_dataloader()))
    # arc-state builds the model from the kwargs dict cell-load filled in (batch_size, cell_sentence_len).
    model_data_kwargs = {**data_kwargs, "batch_size": batch_size, "cell_sentence_len": set_len}
    model = _build_model(plain, model_data_kwargs, var_dims)
    _apply_optimizer_choice(model, training, model_name)
    if plan.resume_from is None:
        _apply_init_from(model, (plain["model"].get("kwargs") or {}).get("init_from"), dm, var_dims, data_kwargs)
    check_resume_fits(model, plan.resume_from, plan.path)

    run_dir = plan.path
    if is_rank_zero:
        from state.training.runlock import RunDirLock

        created = not plan.existed or plan.delete_first
        rundir.open_run_dir(plan)
        # Held from before the first file is written (the Trainer's lock callback takes it over), so
        # that a job killed before its first checkpoint is recognised by its stale lock.
        lock = RunDirLock(run_dir)
        lock.acquire()
        try:
            _write_run_files(run_dir, cfg, dm, var_dims)
        except BaseException:
            lock.release()
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    try:
        return _fit(plain, model, dm, plan, model_name=model_name, is_rank_zero=is_rank_zero)
    finally:
        if is_rank_zero:
            lock.release()  # normally already released by the Trainer's lock callback
            if handshake is not None:
                handshake.retract()  # every rank read it before the processes could meet to train


def _fit(plain: Mapping[str, Any], model: Any, dm: Any, plan: rundir.RunDirPlan, *, model_name: str,
         is_rank_zero: bool) -> TrainResult:
    """Fit ``model`` in the opened run directory (resuming when ``plan`` says so), then write final.ckpt."""
    from state.training.trainer import fit_or_stop

    run_dir = plan.path
    ckpt_dir = run_dir / rundir.CHECKPOINT_DIR
    if plan.resume_from is not None:
        from state.training.checkpoint_io import remove_stale_temp_files

        remove_stale_temp_files(ckpt_dir)
        log.info("resuming from %s", plan.resume_from)

    resume_step = _resume_step(plan.resume_from)
    loggers = _loggers(plain, run_dir, resume_step) if is_rank_zero else []
    strategy = _strategy(plain["training"], model, dm)
    trainer = _trainer(plain, run_dir, max_steps=_max_steps(plain), loggers=loggers, model_name=model_name,
                       strategy=strategy)
    fit_or_stop(trainer, model, datamodule=dm, ckpt_path=str(plan.resume_from) if plan.resume_from else None)

    final = ckpt_dir / "final.ckpt"
    # save_checkpoint is collective under DDP: every rank must take rank 0's decision.
    if trainer.strategy.broadcast(not final.exists(), src=0):
        trainer.save_checkpoint(str(final), weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    return TrainResult(
        run_dir=run_dir,
        checkpoint_paths={n: ckpt_dir / n for n in CHECKPOINT_NAMES if (ckpt_dir / n).is_file()},
        metrics=metrics,
        global_step=int(trainer.global_step),
        resumed_from=plan.resume_from,
    )
