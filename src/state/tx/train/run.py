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

from state.tx import rundir
from state.tx.data import module as tx_data
from state.tx.models import registry
from state.tx.train.memory_guard import check_step_memory
from state.tx.train.resume_check import check_resume_fits
from state.utils.errors import StateError
from state.utils.logging import global_rank

log = logging.getLogger(__name__)

# Training keys this implementation adds to arc-state's config. They are kept out of the model's
# hyper-parameters so checkpoints carry exactly arc-state's keys.
OWN_TRAINING_KEYS = frozenset({"precision"})
CHECKPOINT_NAMES = ("best.ckpt", "last.ckpt", "final.ckpt")


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint_paths: dict[str, Path] = field(default_factory=dict)  # file name -> path, those that exist
    metrics: dict[str, float] = field(default_factory=dict)  # last value of every logged metric
    global_step: int = 0
    resumed_from: Path | None = None


def _plain_config(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception as exc:  # an unresolvable ${...}
            raise StateError(f"the config cannot be resolved: {str(exc).splitlines()[0]}") from exc
    return dict(cfg)


def _validate(cfg: Any) -> None:
    try:
        from state.tx.config.compose import validate_tx_config
    except ImportError:  # config module not present (partial install): structural checks below still run
        validate_tx_config = None
    if validate_tx_config is not None:
        validate_tx_config(cfg)
    missing = [key for key in ("data", "model", "training", "name", "output_dir") if key not in cfg]
    if missing:
        raise StateError(f"the config lacks top-level key(s) {', '.join(missing)}",
                         hint="compose it with `state tx train` or state.tx.config.compose.compose_tx_config")


def sentence_length(model_cfg: Mapping[str, Any]) -> int:
    """Cells per set for the data loader, looked up where arc-state looks (§4.1 step 1)."""
    kwargs = model_cfg.get("kwargs") or {}
    backbone = kwargs.get("transformer_backbone_kwargs") or {}
    name = str(model_cfg.get("name", "")).lower()
    candidates = [model_cfg.get("cell_set_len")]
    if name in ("cpa", "scvi", "scgpt-genetic", "scgpt-chemical"):
        candidates.append(kwargs.get("cell_sentence_len"))
    candidates += [backbone.get("n_positions"), backbone.get("max_position_embeddings"), kwargs.get("cell_set_len")]
    for value in candidates:
        if value is not None:
            return int(value)
    raise StateError("cannot tell the cell set length of this model",
                     hint="add +model.kwargs.transformer_backbone_kwargs.n_positions=<cells per set>")


def decoder_config(model_kwargs: Mapping[str, Any], var_dims: Mapping[str, Any], output_space: str) -> dict | None:
    """The gene decoder arc-state attaches for gene/all output spaces (§4.1 step 5)."""
    if output_space == "embedding":
        return None
    gene_dim = var_dims.get("hvg_dim") if output_space == "gene" else var_dims.get("gene_dim")
    return {
        "latent_dim": var_dims["output_dim"],
        "gene_dim": gene_dim or 2000,
        "hidden_dims": list(model_kwargs.get("decoder_hidden_dims") or [1024, 1024, 512]),
        "dropout": model_kwargs.get("decoder_dropout") or 0.1,
        "residual_decoder": model_kwargs.get("residual_decoder") or False,
    }


def _model_kwargs(plain: Mapping[str, Any], var_dims: Mapping[str, Any], output_space: str) -> dict[str, Any]:
    kwargs = dict(plain["model"].get("kwargs") or {})
    decoder = decoder_config(kwargs, var_dims, output_space)
    if decoder is None:
        kwargs.pop("decoder_cfg", None)
        kwargs["gene_decoder_bool"] = False
    else:
        kwargs["decoder_cfg"] = decoder
    return kwargs


def _build_model(plain: Mapping[str, Any], data_kwargs: Mapping[str, Any], var_dims: Mapping[str, Any]):
    training = {k: v for k, v in plain["training"].items() if k not in OWN_TRAINING_KEYS}
    model_kwargs = _model_kwargs(plain, var_dims, data_kwargs.get("output_space", "gene"))
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


def _apply_init_from(model: Any, init_from: Any) -> None:
    """Fine-tuning start (§4.10): copy the weights whose names and shapes match; the rest stay fresh."""
    if not init_from:
        return
    from state.tx.checkpoint import read_checkpoint

    source = read_checkpoint(init_from)["state_dict"]
    own = model.state_dict()
    matching = {k: v for k, v in source.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matching:
        raise StateError(f"model.kwargs.init_from={init_from}: no weight of that checkpoint fits this model",
                         hint="check that it is a State Transition checkpoint of a compatible size")
    model.load_state_dict(matching, strict=False)
    log.info("init_from %s: copied %d of %d tensors (%d skipped: missing or different shape)",
             init_from, len(matching), len(own), len(own) - len(matching))


def _write_run_files(run_dir: Path, cfg: Any, dm: Any, var_dims: Mapping[str, Any]) -> None:
    rundir.write_config(run_dir, cfg)
    rundir.write_data_module_state(run_dir, dm)
    rundir.write_maps(run_dir, dm)
    rundir.write_var_dims(run_dir, var_dims)


def _loggers(plain: Mapping[str, Any], run_dir: Path, resume_step: int | None) -> list:
    from state.tx.train.callbacks import RunCSVLogger, make_wandb_logger

    loggers: list = [RunCSVLogger(plain["output_dir"], str(plain["name"]), keep_rows_before_step=resume_step)]
    if plain.get("use_wandb"):
        wb = plain.get("wandb") or {}
        logger = make_wandb_logger(
            run_name=str(plain["name"]), project=wb.get("project", "state"), entity=wb.get("entity"),
            save_dir=wb.get("local_wandb_dir", "./wandb_logs"), tags=list(wb.get("tags") or []),
            config=dict(plain), run_dir=run_dir,
        )
        if logger is not None:
            loggers.append(logger)
    return loggers


def _trainer(plain: Mapping[str, Any], run_dir: Path, *, max_steps: int, loggers: list, model_name: str,
             strategy: Any):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from state.tx.train.callbacks import (
        AtomicCheckpointIO,
        BatchSpeedMonitor,
        GradientNormLogger,
        StateProgressBar,
    )
    from state.utils.progress import progress_enabled

    training = plain["training"]
    val_freq = int(training.get("val_freq") or 2000)
    callbacks: list = [
        ModelCheckpoint(
            dirpath=run_dir / rundir.CHECKPOINT_DIR, filename="best", monitor="val_loss", mode="min",
            save_top_k=1, save_last=True, every_n_train_steps=val_freq,
        ),
        BatchSpeedMonitor(interval=50),
    ]
    if registry.model_entry(model_name).canonical == "state":
        from state.tx.train.flops import FlopsMonitor

        callbacks.append(GradientNormLogger())
        if "cumulative_flops_use_backward" in training or training.get("use_mfu"):
            callbacks.append(FlopsMonitor(
                use_backward=bool(training.get("cumulative_flops_use_backward", True)),
                mfu_kwargs=training.get("mfu_kwargs") if training.get("use_mfu") else None,
            ))
    show_bar = progress_enabled()
    if show_bar:
        callbacks.append(StateProgressBar())
    # Lightning logs every 50 steps by default; short runs would end with no metrics.csv at all.
    log_every = training.get("log_every_n_steps") or min(50, max(1, max_steps))
    return pl.Trainer(
        accelerator="auto",
        devices=training.get("devices", 1),
        num_nodes=int(training.get("num_nodes") or 1),  # multi-node: +training.num_nodes=N (Lightning env vars)
        strategy=strategy,
        precision=training.get("precision") or "32-true",
        max_steps=max_steps,
        check_val_every_n_epoch=None,
        val_check_interval=val_freq,
        # A module that steps its own optimizers clips itself (Lightning refuses both at once).
        gradient_clip_val=None if registry.model_entry(model_name).manual_optimization
        else training.get("gradient_clip_val"),
        accumulate_grad_batches=int(training.get("gradient_accumulation_steps") or 1),
        use_distributed_sampler=False,
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        log_every_n_steps=int(log_every),
    )


def _strategy(requested: Any, model: Any, dm: Any) -> Any:
    """DDP refuses parameters that get no gradient; the gene decoder gets none when the data carry no
    expression targets (e.g. embed_key=X_hvg with output_space=gene), so let DDP look for unused ones."""
    decoder_idle = getattr(model, "gene_decoder", None) is not None and not getattr(dm, "store_raw_expression", True)
    if requested == "ddp" and decoder_idle:
        log.info("strategy ddp -> ddp_find_unused_parameters_true: the gene decoder has no targets in this data")
        return "ddp_find_unused_parameters_true"
    return requested


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


def _train(cfg: Any) -> TrainResult:
    import lightning.pytorch as pl

    model_name = (cfg.get("model") or {}).get("name")
    registry.model_class(model_name)  # unknown / unimplemented models fail before any other check
    _validate(cfg)
    plain = _plain_config(cfg)
    training = plain["training"]
    is_rank_zero = global_rank() == 0
    data_kwargs = tx_data.effective_data_kwargs(plain["data"].get("kwargs") or {})
    batch_size = int(training.get("batch_size", 16))
    set_len = sentence_length(plain["model"])
    if registry.model_entry(model_name).one_set_per_batch and set_len > 1 and batch_size != 1:
        # arc-state (§4.1 step 1): these baselines see one set of cell_sentence_len cells per step.
        log.info("training.batch_size=%d -> 1 for %s (cells per step = cell_sentence_len=%d)",
                 batch_size, model_name, set_len)
        batch_size = training["batch_size"] = 1
    tx_data.check_data_inputs(data_kwargs)
    if is_rank_zero:
        plan = rundir.plan_run_dir(plain["output_dir"], plain["name"], overwrite=bool(plain.get("overwrite")))
    else:  # a DDP worker Lightning started re-runs this function: it must not touch the folder
        plan = rundir.worker_plan(plain["output_dir"], plain["name"])

    pl.seed_everything(int(training.get("train_seed", 42)), workers=True, verbose=False)
    dm = tx_data.build_data_module(plain["data"].get("name", "PerturbationDataModule"), data_kwargs,
                                   batch_size=batch_size, cell_sentence_len=set_len)
    var_dims = tx_data.setup_data_module(dm)
    check_step_memory(model_name, plain["model"].get("kwargs") or {}, cells=batch_size * set_len,
                      genes=int(var_dims.get("input_dim") or 0))
    # arc-state builds the training loader once before fit (cell-load's sampler draws from numpy's
    # global RNG when it is built); doing the same keeps the sampled cell sets identical for a seed.
    log.info("training split: %d batches per epoch", len(dm.train_dataloader()))
    # arc-state builds the model from the kwargs dict cell-load filled in (batch_size, cell_sentence_len).
    model_data_kwargs = {**data_kwargs, "batch_size": batch_size, "cell_sentence_len": set_len}
    model = _build_model(plain, model_data_kwargs, var_dims)
    if plan.resume_from is None:
        _apply_init_from(model, (plain["model"].get("kwargs") or {}).get("init_from"))
    check_resume_fits(model, plan.resume_from, plan.path)

    run_dir = plan.path
    if is_rank_zero:
        created = not plan.existed or plan.delete_first
        rundir.open_run_dir(plan)
        try:
            _write_run_files(run_dir, cfg, dm, var_dims)
        except BaseException:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    ckpt_dir = run_dir / rundir.CHECKPOINT_DIR
    if plan.resume_from is not None:
        from state.tx.train.callbacks import remove_stale_temp_files

        remove_stale_temp_files(ckpt_dir)
        log.info("resuming from %s", plan.resume_from)

    resume_step = _resume_step(plan.resume_from)
    loggers = _loggers(plain, run_dir, resume_step) if is_rank_zero else []
    strategy = _strategy(training.get("strategy", "auto"), model, dm)
    trainer = _trainer(plain, run_dir, max_steps=_max_steps(plain), loggers=loggers, model_name=model_name,
                       strategy=strategy)
    trainer.fit(model, datamodule=dm, ckpt_path=str(plan.resume_from) if plan.resume_from else None)

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
