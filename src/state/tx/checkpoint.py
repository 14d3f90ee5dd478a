"""Load tx checkpoints (arc-state 0.11.1 or ours) safely and rebuild the model.

Checkpoints are read with :func:`state.io.safe_load.safe_torch_load` (a restricted unpickler:
nothing in the file can run code). The model is rebuilt from ``hyper_parameters`` (optionally
overridden), then the weights are loaded strictly. Passing a checkpoint of another kind (an SE
embedding checkpoint, a mean baseline where an ST model is expected, ...) gives a one-line
:class:`~state.utils.errors.StateError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from state.io.safe_load import placeholder_to_plain, safe_torch_load
from state.utils.errors import StateError

log = logging.getLogger(__name__)

KIND_STATE_TRANSITION = "state_transition"
KIND_PERTURB_MEAN = "perturb_mean"
KIND_CONTEXT_MEAN = "context_mean"
KIND_SE = "state_embedding"

_KIND_WORDS = {
    KIND_STATE_TRANSITION: "a State Transition (tx, model=state/pertsets) checkpoint",
    KIND_PERTURB_MEAN: "a perturb_mean baseline checkpoint",
    KIND_CONTEXT_MEAN: "a context_mean baseline checkpoint",
    KIND_SE: "a State Embedding (emb) checkpoint",
}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, with ``hyper_parameters`` as plain data. Never executes code."""
    path = Path(path)
    ckpt = safe_torch_load(path, what="checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise StateError(
            f"{path} is not a Lightning checkpoint (no 'state_dict')",
            hint="pass a .ckpt written by `state tx train` (e.g. <run>/checkpoints/final.ckpt)",
        )
    ckpt["hyper_parameters"] = placeholder_to_plain(ckpt.get("hyper_parameters") or {})
    return ckpt


def checkpoint_kind(ckpt: Mapping[str, Any]) -> str:
    """Which model wrote the checkpoint (one of the ``KIND_*`` constants, or 'unknown')."""
    keys = ckpt.get("state_dict", {}).keys()
    hparams = ckpt.get("hyper_parameters") or {}
    if "protein_embeds_dict" in ckpt or "cfg_yaml" in ckpt or "cfg" in hparams:
        return KIND_SE
    if "pert_mean_offsets" in ckpt or "global_basal" in ckpt:
        return KIND_PERTURB_MEAN
    if "celltype_pert_means" in ckpt:
        return KIND_CONTEXT_MEAN
    if any(k.startswith("transformer_backbone.") for k in keys) and any(
        k.startswith("pert_encoder.") for k in keys
    ):
        return KIND_STATE_TRANSITION
    return "unknown"


def require_kind(ckpt: Mapping[str, Any], expected: str, *, path: str | os.PathLike) -> None:
    found = checkpoint_kind(ckpt)
    if found != expected:
        raise StateError(
            f"{path} is {_KIND_WORDS.get(found, 'a checkpoint of an unrecognised model')}, "
            f"expected {_KIND_WORDS.get(expected, expected)}",
            hint="pass the checkpoint of the right model (check --model-dir / --checkpoint)",
        )


def build_from_checkpoint(
    model_cls: type,
    ckpt: Mapping[str, Any],
    *,
    path: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    strict: bool = True,
):
    """Instantiate ``model_cls(**hyper_parameters | overrides)`` and load the weights."""
    hparams = checkpoint_hparams(ckpt, path=path)
    hparams.update(overrides or {})
    model = model_cls(**hparams)
    model.on_load_checkpoint(dict(ckpt))
    load_weights(model, ckpt["state_dict"], path=path, strict=strict)
    model.eval()
    return model


# Every tx model is built from these; a checkpoint without them cannot be rebuilt.
REQUIRED_HPARAMS = ("input_dim", "hidden_dim", "output_dim", "pert_dim")


def checkpoint_hparams(ckpt: Mapping[str, Any], *, path: str | os.PathLike) -> dict[str, Any]:
    """A copy of the checkpoint's ``hyper_parameters``; one-line error when absent or incomplete."""
    hparams = dict(ckpt.get("hyper_parameters") or {})
    missing = [key for key in REQUIRED_HPARAMS if hparams.get(key) is None]
    if not hparams or missing:
        what = "no hyper_parameters" if not hparams else f"no {', '.join(missing)} in its hyper_parameters"
        raise StateError(f"{path} has {what}", hint="pass a checkpoint written by `state tx train`")
    return hparams


def load_weights(model: Any, state_dict: Mapping[str, Any], *, path: str | os.PathLike, strict: bool = True) -> None:
    """``model.load_state_dict`` with a one-line error naming the checkpoint when shapes/keys differ."""
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise StateError(
            f"{path}: weights do not fit the model rebuilt from its hyper_parameters ({detail[:300]})",
            hint="do not override architecture settings when loading, or re-train",
        ) from exc


def load_state_transition(
    path: str | os.PathLike,
    *,
    overrides: Mapping[str, Any] | None = None,
    map_location: Any = "cpu",
):
    """Load a State Transition checkpoint (arc-state's or ours) in eval mode on ``map_location``."""
    from state.tx.models.state_transition import StateTransitionPerturbationModel

    ckpt = read_checkpoint(path)
    require_kind(ckpt, KIND_STATE_TRANSITION, path=path)
    model = build_from_checkpoint(StateTransitionPerturbationModel, ckpt, path=path, overrides=overrides)
    log.info("loaded %s (%s backbone)", path, model.transformer_backbone_key)
    return model.to(map_location)
