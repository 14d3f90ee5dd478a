"""One registry from ``model.name`` (case-insensitive, with arc-state's aliases) to a LightningModule.

``train``, ``predict`` and ``infer`` all dispatch through here; nothing else branches on model names:
what differs between models (cells per step, extra logging, how infer loads them) is a field of
their :class:`ModelEntry`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# model_entry, ModelEntry and MODEL_NAME_KEY stay importable from here for the callers of the registry.
from state.tx.models.entries import ENTRIES, MODEL_NAME_KEY, ModelEntry, model_entry  # noqa: F401
from state.utils.errors import StateError

log = logging.getLogger(__name__)


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
    for entry in ENTRIES:
        if entry.checkpoint_marker and entry.checkpoint_marker in checkpoint:
            return entry
    return model_entry("state")


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
    if entry.lightning_free_inference:
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
