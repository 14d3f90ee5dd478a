"""One registry from ``model.name`` (case-insensitive, with arc-state's aliases) to a LightningModule.

``train``, ``predict`` and ``infer`` all dispatch through here; nothing else branches on model names.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from state.utils.errors import StateError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: where its class lives and how ``train`` treats it."""

    canonical: str
    target: str  # "module:Class", imported only when the model is used
    forced_max_steps: int | None = None  # statistics baselines finish in one step
    passes_basal_mapping_strategy: bool = False  # arc-state adds this kwarg for the state model only
    checkpoint_marker: str | None = None  # a top-level checkpoint key that identifies the class
    one_set_per_batch: bool = False  # arc-state forces training.batch_size=1 (cells per batch = set length)
    manual_optimization: bool = False  # the module steps its own optimizers: no Trainer gradient clipping


_ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry("state", "state.tx.models.state_transition:StateTransitionPerturbationModel",
               passes_basal_mapping_strategy=True),
    ModelEntry("perturb_mean", "state.tx.models.mean_baselines:PerturbMeanPerturbationModel",
               forced_max_steps=1, checkpoint_marker="pert_mean_offsets"),
    ModelEntry("context_mean", "state.tx.models.mean_baselines:ContextMeanPerturbationModel",
               forced_max_steps=1, checkpoint_marker="celltype_pert_means"),
    ModelEntry("embedsum", "state.tx.models.embedsum:EmbedSumPerturbationModel"),
    ModelEntry("old_neuralot", "state.tx.models.state_variants:OldNeuralOTPerturbationModel"),
    ModelEntry("decoder_only", "state.tx.models.decoder_only:DecoderOnlyPerturbationModel"),
    ModelEntry("pseudobulk", "state.tx.models.state_variants:PseudobulkPerturbationModel"),
    ModelEntry("cpa", "state.tx.models.cpa:CPAPerturbationModel", one_set_per_batch=True,
               manual_optimization=True),
    ModelEntry("scvi", "state.tx.models.scvi:ScVIPerturbationModel", one_set_per_batch=True),
    ModelEntry("scgpt-genetic", "state.tx.models.scgpt:ScGPTPerturbationModel", one_set_per_batch=True),
    ModelEntry("scgpt-chemical", "state.tx.models.scgpt:ScGPTPerturbationModel", one_set_per_batch=True),
)
# Top-level checkpoint key our zoo models write with their canonical name (arc-state never wrote one).
MODEL_NAME_KEY = "state_tx_model"
_BY_NAME = {entry.canonical: entry for entry in _ENTRIES}
# arc-state's alternative spellings of the same models.
ALIASES: dict[str, str] = {
    "neuralot": "state",
    "pertsets": "state",
    "globalsimplesum": "perturb_mean",
    "celltypemean": "context_mean",
}


def available_models() -> list[str]:
    """Every accepted ``model.name`` (canonical names and arc-state's aliases)."""
    return sorted([e.canonical for e in _ENTRIES] + list(ALIASES))


def model_entry(name: Any) -> ModelEntry:
    """Look a ``model.name`` up (case-insensitive, aliases allowed); unknown names raise a one-line StateError."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    entry = _BY_NAME.get(key)
    choices = ", ".join(available_models())
    if entry is None:
        raise StateError(f"unknown model.name '{name}'", hint=f"use one of: {choices} (e.g. model=state)")
    return entry


def model_class(name: Any) -> type:
    entry = model_entry(name)
    module_name, class_name = entry.target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def lightning_module_kwargs(
    name: Any,
    *,
    data_kwargs: Mapping[str, Any],
    model_kwargs: Mapping[str, Any],
    training: Mapping[str, Any],
    var_dims: Mapping[str, Any],
) -> dict[str, Any]:
    """The constructor kwargs arc-state's ``get_lightning_module`` passes (so hparams match key for key)."""
    entry = model_entry(name)
    kwargs: dict[str, Any] = {**dict(model_kwargs), **dict(training)}
    output_space = data_kwargs.get("output_space", "gene")
    kwargs.update(
        embed_key=data_kwargs.get("embed_key"),
        output_space=output_space,
        gene_names=list(var_dims.get("gene_names") or []),
        batch_size=data_kwargs.get("batch_size", training.get("batch_size")),
        control_pert=data_kwargs.get("control_pert", "non-targeting"),
    )
    if entry.passes_basal_mapping_strategy:
        kwargs["basal_mapping_strategy"] = data_kwargs.get("basal_mapping_strategy", "random")
    kwargs.update(
        input_dim=var_dims["input_dim"],
        gene_dim=var_dims["hvg_dim"] if output_space == "gene" else var_dims["gene_dim"],
        hvg_dim=var_dims["hvg_dim"],
        output_dim=var_dims["output_dim"],
        pert_dim=var_dims["pert_dim"],
        batch_dim=var_dims["batch_dim"],
    )
    return kwargs


def build_lightning_module(name: Any, **parts: Mapping[str, Any]):
    """Instantiate the registered class for ``name`` from data/model/training config and var_dims."""
    cls = model_class(name)
    kwargs = lightning_module_kwargs(name, **parts)
    log.info("model %s (%s)", model_entry(name).canonical, cls.__name__)
    return cls(**kwargs)


def entry_for_checkpoint(checkpoint: Mapping[str, Any], model_name: Any = None) -> ModelEntry:
    """Which class wrote a checkpoint: the given name, else a marker key, else the state model."""
    if model_name is not None:
        return model_entry(model_name)
    if checkpoint.get(MODEL_NAME_KEY):
        return model_entry(checkpoint[MODEL_NAME_KEY])
    for entry in _ENTRIES:
        if entry.checkpoint_marker and entry.checkpoint_marker in checkpoint:
            return entry
    return _BY_NAME["state"]


def load_model_checkpoint(path: str | Path, *, model_name: Any = None, **overrides: Any):
    """Load any registered model from a Lightning checkpoint (ours or arc-state's) without unsafe unpickling.

    The class comes from ``model_name`` when given, else from the checkpoint itself (the mean
    baselines store their statistics under their own keys; anything else is the state model).
    ``overrides`` replace saved hyper-parameters (arc-state's predict passes the current var_dims
    and model kwargs this way). Returns the module in eval mode.
    """
    from state.tx.checkpoint import build_from_checkpoint

    checkpoint, entry = _read_tx_checkpoint(path, model_name)
    return build_from_checkpoint(model_class(entry.canonical), checkpoint, path=path, overrides=overrides)


def load_inference_module(path: str | Path, *, model_name: Any = None):
    """Like :func:`load_model_checkpoint`, for inference: the ``state`` model comes back as a plain
    :class:`~state.tx.infer.net.TransitionInferenceModel` (no Lightning import); other models as
    their LightningModule."""
    checkpoint, entry = _read_tx_checkpoint(path, model_name)
    if entry.canonical == "state":
        from state.tx.infer.net import TransitionInferenceModel

        return TransitionInferenceModel.from_checkpoint(checkpoint, path=path)
    from state.tx.checkpoint import build_from_checkpoint

    return build_from_checkpoint(model_class(entry.canonical), checkpoint, path=path)


def _read_tx_checkpoint(path: str | Path, model_name: Any) -> tuple[dict[str, Any], ModelEntry]:
    from state.tx.checkpoint import KIND_SE, checkpoint_kind, read_checkpoint

    checkpoint = read_checkpoint(path)
    if checkpoint_kind(checkpoint) == KIND_SE:
        raise StateError(f"{path} is a State Embedding (SE) checkpoint, not a tx model",
                         hint="use it with `state emb transform`; pass a checkpoint written by `state tx train`")
    return checkpoint, entry_for_checkpoint(checkpoint, model_name)
