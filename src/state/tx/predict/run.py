"""``state tx predict``: predict a run's test split and score it with cell-eval.

Layout of the outputs follows arc-state 0.11.1 so downstream scripts keep
working: ``<run>/eval_<checkpoint>/adata_pred.h5ad`` and ``adata_real.h5ad`` (one row per
predicted cell, or per (context, perturbation) with ``--pseudobulk``), plus cell-eval's CSVs per
cell type. Unlike arc-state, ``var`` carries gene names, the run directory may have been moved
(paths stored inside it are only used when they still exist), and plots are written next to the
CSVs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from state.io.atomic import atomic_write_h5ad
from state.tx import rundir
from state.tx.predict.collect import PredictionCollector, build_anndatas
from state.utils.device import batch_to_device, inference_device
from state.utils.errors import StateError
from state.utils.progress import progress

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    eval_dir: Path
    n_cells: int
    adata_paths: list[Path] = field(default_factory=list)
    metrics: dict[str, object] = field(default_factory=dict)  # cell type -> aggregate table (polars)
    scores_eval2: dict[str, object] = field(default_factory=dict)  # cell type -> cell-eval2 scores (pandas)
    baselines: object = None  # --baselines: model vs perturb_mean / linear table (pandas), else None


def load_run_config(output_dir: Path) -> dict:
    """The run's config.yaml; refuses SE folders and configs without data/model sections."""
    rundir.refuse_se_folder(output_dir)
    cfg = rundir.read_config(output_dir)
    if "data" not in cfg or "model" not in cfg:
        raise StateError(f"{output_dir / rundir.CONFIG_FILE} is not a state run config (no data/model sections)")
    return cfg


def load_datamodule(run_dir: Path, cfg: dict, *, toml: str | None):
    """Rebuild cell-load's data module from ``data_module.torch`` (read safely), relocating its TOML."""
    from state.tx.data.module import cap_num_workers, state_data_module_class

    state = rundir.read_data_module_state(run_dir)
    candidates = [toml, state.get("toml_config_path"), cfg["data"]["kwargs"].get("toml_config_path")]
    chosen = next((c for c in candidates if c and Path(c).is_file()), None)
    if chosen is None:
        raise StateError(
            f"the TOML split file of this run was not found (looked for: {', '.join(str(c) for c in candidates if c)})",
            hint="pass --toml path/to/split.toml",
        )
    state["toml_config_path"] = str(Path(chosen).resolve())
    state["num_workers"] = cap_num_workers(state.get("num_workers", 0))
    state.setdefault("barcode", True)
    module = state_data_module_class()(**state)
    from state.tx.combinations import apply_to_data_module, settings_from_config

    apply_to_data_module(module, settings_from_config(cfg))
    module.setup()
    return module


def _test_time_finetune(model, loader, *, epochs: int, control: str) -> None:
    """arc-state's recipe: Adam lr 1e-5 on control-only sets, one set per step."""
    import inspect
    import warnings

    if "padded" not in inspect.signature(model.training_step).parameters or model.automatic_optimization is False:
        raise StateError(f"--test-time-finetune is not supported for {type(model).__name__}",
                         hint="drop --test-time-finetune for this model")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    steps = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no trainer attached: nothing to log to
        for _ in range(epochs):
            for idx, batch in enumerate(loader):
                if batch["pert_name"][0] != control:
                    continue
                optimizer.zero_grad()
                loss = model.training_step(model.normalize_batch(batch_to_device(batch, model.device)), idx,
                                           padded=False)
                loss.backward()
                optimizer.step()
                steps += 1
    log.info("test-time fine-tuning: %d steps over %d epoch(s)", steps, epochs)
    model.eval()


def _load_model(ckpt: Path, cfg: dict):
    """The run's model class from config, seeded as arc-state's predict seeds it, in eval mode."""
    import lightning.pytorch as pl

    from state.tx.models.registry import load_model_checkpoint

    pl.seed_everything(int(cfg.get("training", {}).get("train_seed", 42)), verbose=False)
    model = load_model_checkpoint(ckpt, model_name=cfg["model"].get("name"))
    model.to(inference_device())
    model.eval()
    describe = getattr(model, "describe_choices", None)  # what a data-driven model chose (ridges, gate)
    if describe is not None:
        log.info("%s", describe())
    return model


def _collect(model, loader, collector: PredictionCollector) -> PredictionCollector:
    total = getattr(getattr(loader, "batch_sampler", None), "tot_num", None)
    with torch.inference_mode():
        for idx, batch in enumerate(progress(loader, desc="predict", total=len(loader), unit="sets")):
            out = model.predict_step(batch_to_device(batch, model.device), idx, padded=False)
            collector.add(batch, out)
    log.info("predicted %d cells%s", collector.n_cells, f" of {total}" if total else "")
    return collector


def check_stream_flags(*, predict_only: bool, skip_adatas: bool, stream_adatas: bool, pseudobulk: bool) -> bool:
    """arc-state main's rules for ``--stream-adatas``, checked before anything is loaded; returns
    whether to stream (``--pseudobulk`` already aggregates with little memory, so it wins)."""
    if predict_only and skip_adatas:
        log.warning("--predict-only with --skip-adatas: nothing but the predictions' count will come out")
    if stream_adatas and not predict_only:
        raise StateError("--stream-adatas requires --predict-only: streaming skips the in-process cell-eval",
                         hint="add --predict-only and score the written h5ads downstream")
    if stream_adatas and skip_adatas:
        raise StateError("--stream-adatas cannot be combined with --skip-adatas: streaming exists to write the "
                         "AnnData outputs", hint="drop one of the two flags")
    if stream_adatas and pseudobulk:
        log.warning("--stream-adatas ignored: --pseudobulk already aggregates in a streaming, low-memory fashion")
        return False
    return stream_adatas


def hvg_names_uns(data_kwargs: dict, gene_names: list[str]) -> dict:
    """``uns['X_hvg_var_names']`` for HVG-space outputs (arc-state PR #246), when the run names its genes."""
    from state.io.hvg_names import HVG_NAMES_KEY, as_names_array

    hvg_space = data_kwargs.get("embed_key") == "X_hvg" or data_kwargs.get("output_space", "gene") == "gene"
    return {HVG_NAMES_KEY: as_names_array(gene_names)} if hvg_space and gene_names else {}


def _stream(model, loader, eval_dir: Path, data_kwargs: dict, *, keep_perts, gene_names) -> PredictResult:
    """Predict and write adata_pred / adata_real batch by batch (bounded memory, no metrics)."""
    from state.io.atomic import atomic_path
    from state.tx.predict.collect import _obs_frame, _var
    from state.tx.predict.stream import StreamingCollector

    eval_dir.mkdir(parents=True, exist_ok=True)
    n_obs = getattr(getattr(loader, "batch_sampler", None), "tot_num", None) or len(loader.dataset)
    paths = [eval_dir / "adata_pred.h5ad", eval_dir / "adata_real.h5ad"]
    with atomic_path(paths[0]) as tmp_pred, atomic_path(paths[1]) as tmp_real:
        collector = StreamingCollector(tmp_pred, tmp_real, n_obs=n_obs, embed_key=data_kwargs.get("embed_key"),
                                       output_space=data_kwargs.get("output_space", "gene"), keep_perts=keep_perts)
        try:
            _collect(model, loader, collector)
            _, obs = collector.stacked()
            obs = _obs_frame(obs, pert_col=data_kwargs.get("pert_col", "gene"),
                             cell_type_key=data_kwargs.get("cell_type_key", "cell_type"),
                             batch_key=data_kwargs.get("batch_col") or "batch")
            collector.finish(obs, lambda width: _var(width, gene_names or None), hvg_names_uns(data_kwargs, gene_names))
        except BaseException:
            collector.abort()
            raise
    log.info("Streaming complete; skipping in-process cell-eval. Score the written h5ads downstream.")
    return PredictResult(eval_dir=eval_dir, n_cells=collector.n_cells, adata_paths=paths)


def predict(
    output_dir: str | Path,
    *,
    toml: str | None = None,
    checkpoint: str | Path = rundir.PREDICT_CHECKPOINT,
    test_time_finetune: int = 0,
    profile: str = "full",
    predict_only: bool = False,
    skip_adatas: bool = False,
    shared_only: bool = False,
    eval_train_data: bool = False,
    pseudobulk: bool = False,
    stream_adatas: bool = False,
    scorer: str = "cell-eval",
    preset: str | None = None,
    baselines: bool = False,
    eval_dir: str | Path | None = None,
) -> PredictResult:
    stream_adatas = check_stream_flags(predict_only=predict_only, skip_adatas=skip_adatas,
                                       stream_adatas=stream_adatas, pseudobulk=pseudobulk)
    if baselines and (predict_only or scorer == "cell-eval2"):
        raise StateError("--baselines scores perturb_mean and linear with cell-eval, which "
                         + ("--predict-only skips" if predict_only else "--scorer cell-eval2 does not run"),
                         hint="drop --baselines, or score with --scorer cell-eval or both")
    use_eval2, preset = _scorer_plan(scorer, preset, predict_only=predict_only)
    output_dir = Path(output_dir)
    cfg = load_run_config(output_dir)
    run_dir = rundir.stored_run_dir(output_dir, cfg)
    ckpt = rundir.checkpoint_path(run_dir, checkpoint, default=rundir.PREDICT_CHECKPOINT)
    data = load_datamodule(run_dir, cfg, toml=toml)
    model = _load_model(ckpt, cfg)
    control = str(data.get_control_pert())
    loader = data.train_dataloader(test=True) if eval_train_data else data.test_dataloader()
    if not loader:
        raise StateError("this run's TOML has no test split to predict", hint="add a [zeroshot] or [fewshot] test entry, or pass --toml")
    if test_time_finetune > 0:
        _test_time_finetune(model, loader, epochs=test_time_finetune, control=control)
    shared = data.get_shared_perturbations() if shared_only else None
    eval_dir = Path(eval_dir) if eval_dir else output_dir / f"{'eval_train_' if eval_train_data else 'eval_'}{ckpt.name}"
    data_kwargs = cfg["data"]["kwargs"]
    if stream_adatas:
        return _stream(model, loader, eval_dir, data_kwargs, keep_perts=shared, gene_names=rundir.read_genes(run_dir))
    collector = _collect(model, loader, PredictionCollector(pseudobulk=pseudobulk, keep_perts=shared))
    eval_dir.mkdir(parents=True, exist_ok=True)
    adata_pred, adata_real = _anndatas(collector, data_kwargs, rundir.read_genes(run_dir))
    result = PredictResult(eval_dir=eval_dir, n_cells=adata_pred.n_obs)
    if not skip_adatas:
        for name, adata in (("adata_pred.h5ad", adata_pred), ("adata_real.h5ad", adata_real)):
            result.adata_paths.append(atomic_write_h5ad(adata, eval_dir / name))
    scoring = _Scoring(eval_dir=eval_dir, control=control, data_kwargs=data_kwargs, profile=profile,
                       cell_eval=not predict_only and scorer != "cell-eval2", eval2_preset=preset if use_eval2 else None,
                       baselines=baselines, seed=int(cfg.get("training", {}).get("train_seed", 42)))
    _score(result, scoring, data, adata_pred, adata_real)
    return result


def _scorer_plan(scorer: str, preset: str | None, *, predict_only: bool) -> tuple[bool, str]:
    """(whether cell-eval2 scores, its preset); a missing extra is refused before any work is done."""
    from state.tx.predict import eval2

    if scorer not in eval2.SCORERS:
        raise StateError(f"unknown scorer '{scorer}'", hint=f"use one of {', '.join(eval2.SCORERS)}")
    use_eval2 = scorer != "cell-eval" and not predict_only
    preset = preset or eval2.DEFAULT_PRESET
    if use_eval2:
        eval2.require_cell_eval2(preset)  # before any work, so a missing extra writes nothing
    return use_eval2, preset


def _anndatas(collector: PredictionCollector, data_kwargs: dict, gene_names: list[str]):
    """(adata_pred, adata_real) in arc-state's layout, with the HVG names in ``uns``."""
    adata_pred, adata_real = build_anndatas(
        collector, pert_col=data_kwargs.get("pert_col", "gene"),
        cell_type_key=data_kwargs.get("cell_type_key", "cell_type"),
        batch_key=data_kwargs.get("batch_col") or "batch", embed_key=data_kwargs.get("embed_key"),
        output_space=data_kwargs.get("output_space", "gene"), gene_names=gene_names or None,
    )
    for adata in (adata_pred, adata_real):
        adata.uns.update(hvg_names_uns(data_kwargs, gene_names))
    return adata_pred, adata_real


@dataclass
class _Scoring:
    """What predict scores with, decided from the flags before any work."""

    eval_dir: Path
    control: str
    data_kwargs: dict
    profile: str
    cell_eval: bool  # cell-eval metrics and plots (not with --predict-only or --scorer cell-eval2)
    eval2_preset: str | None  # cell-eval2 preset, or None when cell-eval2 does not score
    baselines: bool  # --baselines: perturb_mean and linear scored beside the model (needs cell_eval)
    seed: int = 0  # the run's training.train_seed: the baselines' control draws


def _score(result: PredictResult, how: _Scoring, data, adata_pred, adata_real) -> None:
    pert_col = how.data_kwargs.get("pert_col", "gene")
    cell_type_key = how.data_kwargs.get("cell_type_key", "cell_type")
    embed_key = how.data_kwargs.get("embed_key")
    if how.eval2_preset is not None:
        from state.tx.predict import eval2

        result.scores_eval2 = eval2.score_with_cell_eval2(
            adata_pred, adata_real, outdir=how.eval_dir, control_pert=how.control, pert_col=pert_col,
            cell_type_key=cell_type_key, preset=how.eval2_preset)
    if not how.cell_eval:
        return
    from state.tx.predict.evaluate import evaluate_and_plot

    result.metrics = evaluate_and_plot(adata_pred, adata_real, outdir=how.eval_dir, control_pert=how.control,
                                       pert_col=pert_col, cell_type_key=cell_type_key, embed_key=embed_key,
                                       profile=how.profile)
    if how.baselines:
        from state.tx.predict.baselines import compare_with_baselines

        result.baselines = compare_with_baselines(
            data, adata_pred, adata_real, result.metrics, eval_dir=how.eval_dir, control=how.control,
            pert_col=pert_col, cell_type_key=cell_type_key, embed_key=embed_key, profile=how.profile,
            seed=how.seed)

__all__ = ["PredictResult", "predict"]
