"""``model.kwargs.init_from``: start training from another run's weights, across vocabularies.

A checkpoint's perturbation encoder, batch embedding and gene-facing layers are indexed by that
run's perturbations, batches and genes. Fine-tuning on another screen changes those lists, so a
tensor is copied row by row *by name*: each name of the new run that the source run knew gets the
source's row (or column), every other one keeps the fresh initialisation of the new model. Tensors
indexed by nothing of the kind (the backbone, hidden layers) are copied whole and must have the same
shape: a different hidden size or another backbone stops with one line naming the key and both
shapes. Copying by position when the names differ (what a name-and-shape match does) would give one
perturbation another's weights without a word.

Which dimension of which tensor is indexed by what follows from the model's parts (see ``_ROLES``),
not from the sizes, so equal counts of different names are still mapped by name. The source's names
come from its run directory (the checkpoint's ``../``: ours or arc-state's maps, see
:mod:`state.tx.rundir`); a checkpoint without its run directory falls back to the gene names in its
hyper-parameters and copies perturbation / batch rows by position only when the counts match, saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from state.utils.errors import StateError

log = logging.getLogger(__name__)

# (part of the model, which of its Linear / Embedding layers, which side, what indexes that side).
# "features" are the model's input/output features: genes when it reads .X or X_hvg, else an embedding.
_ROLES = (
    ("pert_encoder", "first", "in", "perturbations"),
    ("basal_encoder", "first", "in", "features"),
    ("project_out", "last", "out", "features"),
    ("final_down_then_up", "first", "in", "features"),
    ("final_down_then_up", "last", "out", "features"),
    ("gene_decoder", "first", "in", "features"),
    ("gene_decoder", "last", "out", "genes"),
    ("batch_encoder", "first", "rows", "batches"),
    ("batch_classifier", "last", "out", "batches"),
)
# Parts whose inner width follows the gene count (output_space=all's bottleneck is genes // 8):
# a different width there is a consequence of the new genes, so those tensors start fresh.
_DERIVED_WIDTH_PARTS = ("final_down_then_up.",)
GENE_FEATURE_KEYS = (None, "X_hvg")  # embed_key values whose features are genes


@dataclass(frozen=True)
class Vocabulary:
    """The names that index a run's tensors (None: unknown, or not one name per row)."""

    perturbations: list[str] | None
    genes: list[str] | None
    batches: list[str] | None
    features_are_genes: bool

    def names(self, kind: str, size: int) -> list[str] | None:
        if kind == "features":
            names = self.genes if self.features_are_genes else None
        else:
            names = {"perturbations": self.perturbations, "genes": self.genes, "batches": self.batches}[kind]
        return names if names is not None and len(names) == size else None


def onehot_names(mapping: Mapping[str, Any] | None) -> list[str] | None:
    """Names in one-hot index order, or None when the map holds feature vectors (or is absent)."""
    if not mapping:
        return None
    names: dict[int, str] = {}
    for name, vector in mapping.items():
        vec = torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
        if int((vec != 0).sum()) != 1 or float(vec.max()) != 1.0:
            return None  # perturbation_features_file: rows are features, not names
        names[int(vec.argmax())] = str(name)
    size = torch.as_tensor(next(iter(mapping.values()))).numel()
    return [names[i] for i in range(size)] if len(names) == size else None


def source_vocabulary(checkpoint: Path, hparams: Mapping[str, Any]) -> tuple[Vocabulary, Path | None]:
    """The names of a checkpoint's run (``<run>/checkpoints/<file>``; ours or arc-state's)."""
    from state.tx import rundir

    run = checkpoint.parent.parent if checkpoint.parent.name == rundir.CHECKPOINT_DIR else checkpoint.parent
    has_run = rundir.find_map_file(run, "perturbation") is not None
    genes = rundir.read_genes(run) if has_run else []
    genes = genes or [str(g) for g in hparams.get("gene_names") or []]
    return Vocabulary(
        perturbations=onehot_names(rundir.read_map(run, "perturbation")) if has_run else None,
        genes=genes or None,
        batches=onehot_names(rundir.read_map(run, "batch")) if has_run else None,
        features_are_genes=hparams.get("embed_key") in GENE_FEATURE_KEYS,
    ), (run if has_run else None)


def target_vocabulary(data_module: Any, var_dims: Mapping[str, Any], embed_key: str | None) -> Vocabulary:
    """The names of the run being trained, from its data module."""
    return Vocabulary(
        perturbations=onehot_names(getattr(data_module, "pert_onehot_map", None)),
        genes=[str(g) for g in var_dims.get("gene_names") or []] or None,
        batches=onehot_names(getattr(data_module, "batch_onehot_map", None)),
        features_are_genes=embed_key in GENE_FEATURE_KEYS,
    )


def vocabulary_axes(model: nn.Module) -> dict[str, dict[int, str]]:
    """``state_dict`` key -> {dimension: what indexes it} for the model's name-indexed tensors."""
    axes: dict[str, dict[int, str]] = {}
    for part_name, which, side, kind in _ROLES:
        part = getattr(model, part_name, None)
        if not isinstance(part, nn.Module):
            continue
        layers = [(n, m) for n, m in part.named_modules() if isinstance(m, nn.Linear | nn.Embedding)]
        if not layers:
            continue
        name, layer = layers[0] if which == "first" else layers[-1]
        prefix = f"{part_name}.{name}." if name else f"{part_name}."
        if isinstance(layer, nn.Embedding):
            axes.setdefault(f"{prefix}weight", {})[0] = kind
            continue
        if side in ("in", "rows"):  # a Linear's inputs are its weight's columns
            axes.setdefault(f"{prefix}weight", {})[1] = kind
        else:
            axes.setdefault(f"{prefix}weight", {})[0] = kind
            if layer.bias is not None:
                axes.setdefault(f"{prefix}bias", {})[0] = kind
    return axes


@dataclass
class InitReport:
    checkpoint: Path
    copied: list[str] = field(default_factory=list)  # whole tensors
    mapped: list[str] = field(default_factory=list)  # tensors copied row by row by name
    new: list[str] = field(default_factory=list)  # fresh initialisation
    unused: list[str] = field(default_factory=list)  # source tensors this model has no place for
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (found in source, total)
    by_position: set[str] = field(default_factory=set)  # kinds whose source names were unknown

    def table(self) -> str:
        lines = [f"init_from {self.checkpoint}:",
                 f"  {'tensors copied':<28}{len(self.copied):>6}",
                 f"  {'tensors mapped by name':<28}{len(self.mapped):>6}"]
        rows = dict(self.rows)
        if rows.get("features") == rows.get("genes") and "features" not in self.by_position:
            rows.pop("features")  # gene features (.X / X_hvg): the same genes as the decoder's
        for kind, (found, total) in rows.items():
            how = "  (by position: not known by name in both runs)" if kind in self.by_position else ""
            label = "feature genes" if kind == "features" else kind
            lines.append(f"    {label + ' mapped':<26}{found:>6} of {total}{how}")
        lines.append(f"  {'tensors new (fresh init)':<28}{len(self.new):>6}" + _examples(self.new))
        lines.append(f"  {'source tensors not used':<28}{len(self.unused):>6}" + _examples(self.unused))
        return "\n".join(lines)


def _examples(keys: list[str]) -> str:
    return f"  ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""


def _unwrapped(key: str) -> str:
    """A backbone key without peft's LoRA wrapping (``base_model.model.`` / ``.base_layer.``)."""
    return key.replace("base_model.model.", "").replace(".base_layer.", ".")


def _key_matcher(source: Mapping[str, Any]):
    """``key -> the source's name for it``: the same name, or the same layer with / without LoRA
    wrapping (a LoRA run fine-tuned from a plain checkpoint, or the reverse; adapters match only
    adapters). None when the source has no such tensor."""
    by_plain = {_unwrapped(k): k for k in source if "lora_" not in k}

    def match(key: str) -> str | None:
        if key in source:
            return key
        return None if "lora_" in key else by_plain.get(_unwrapped(key))

    return match


def _mismatch(where: str, key: str, src: torch.Tensor, dst: torch.Tensor, why: str = "") -> StateError:
    return StateError(
        f"model.kwargs.init_from={where}: {key} has shape {tuple(src.shape)} there but {tuple(dst.shape)} in this "
        f"model{why}",
        hint="fine-tune a checkpoint of the same architecture (hidden size, layers, backbone); only "
        "perturbations, genes and batches may differ",
    )


def _map_tensor(key: str, src: torch.Tensor, dst: torch.Tensor, axes: Mapping[int, str], source: Vocabulary,
                target: Vocabulary, report: InitReport) -> torch.Tensor | None:
    """``dst`` (fresh) with the source's rows of every name both runs know; None: keep ``dst`` whole."""
    where = str(report.checkpoint)
    if src.dim() != dst.dim():
        raise _mismatch(where, key, src, dst)
    for dim in range(dst.dim()):
        if dim not in axes and src.shape[dim] != dst.shape[dim]:
            if key.startswith(_DERIVED_WIDTH_PARTS):
                return None
            raise _mismatch(where, key, src, dst)
    src_index: list[torch.Tensor | None] = [None] * dst.dim()
    dst_index: list[torch.Tensor | None] = [None] * dst.dim()
    for dim, kind in axes.items():
        src_names = source.names(kind, src.shape[dim])
        dst_names = target.names(kind, dst.shape[dim])
        if src_names is None or dst_names is None:
            if src.shape[dim] != dst.shape[dim]:
                raise _mismatch(where, key, src, dst, f"; its {kind} are not known by name (keep the checkpoint inside its run directory)")
            if kind != "features" or (src_names is None) != (dst_names is None):  # embeddings: positional
                report.by_position.add(kind)
            report.rows.setdefault(kind, (dst.shape[dim], dst.shape[dim]))
            continue
        position = {name: i for i, name in enumerate(src_names)}
        kept = [i for i, name in enumerate(dst_names) if name in position]
        report.rows.setdefault(kind, (len(kept), len(dst_names)))
        src_index[dim] = torch.tensor([position[dst_names[i]] for i in kept], dtype=torch.long)
        dst_index[dim] = torch.tensor(kept, dtype=torch.long)
    picked = src
    for dim, index in enumerate(src_index):
        if index is not None:
            picked = picked.index_select(dim, index)
    out = dst.detach().clone()
    # open-mesh indices: rows of each named dimension, everything along the others
    mesh = []
    for dim, index in enumerate(dst_index):
        index = torch.arange(dst.shape[dim]) if index is None else index
        shape = [1] * dst.dim()
        shape[dim] = -1
        mesh.append(index.reshape(shape))
    out[tuple(mesh)] = picked.to(out.dtype)
    return out


def _check_same_backbone(own: Mapping[str, Any], source: Mapping[str, Any], match, where: str) -> None:
    """Another backbone shares no key with this one: one line, not a silently fresh model."""
    ours = [k for k in own if k.startswith("transformer_backbone.") and "lora_" not in k]
    theirs = [k for k in source if k.startswith("transformer_backbone.")]
    if ours and theirs and not any(match(k) for k in ours):
        raise StateError(
            f"model.kwargs.init_from={where}: its backbone is not this model's ({theirs[0]} there, "
            f"{ours[0]} here)",
            hint="use the same model.kwargs.transformer_backbone_key and backbone settings as the checkpoint's run",
        )


def init_from_checkpoint(model: nn.Module, path: str | Path, target: Vocabulary) -> InitReport:
    """Load ``path``'s weights into the freshly built ``model``, mapping named rows (see module doc)."""
    from state.tx.checkpoint import read_checkpoint

    path = Path(str(path))
    ckpt = read_checkpoint(path)
    source_state = ckpt["state_dict"]
    source, run = source_vocabulary(path, ckpt.get("hyper_parameters") or {})
    if run is None:
        log.warning("init_from %s: no run directory beside checkpoints/ (pert_onehot_map.pt): perturbation and "
                    "batch rows can only be copied by position", path)
    own = model.state_dict()
    match = _key_matcher(source_state)
    _check_same_backbone(own, source_state, match, str(path))
    axes = vocabulary_axes(model)
    report = InitReport(checkpoint=path)
    loaded: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, fresh in own.items():
        src_key = match(key)
        if src_key is None:
            report.new.append(key)
            continue
        used.add(src_key)
        src = torch.as_tensor(source_state[src_key])
        if key not in axes:
            if tuple(src.shape) != tuple(fresh.shape):
                if key.startswith(_DERIVED_WIDTH_PARTS):
                    report.new.append(key)
                    continue
                raise _mismatch(str(path), key, src, fresh)
            loaded[key] = src
            report.copied.append(key)
            continue
        mapped = _map_tensor(key, src, fresh, axes[key], source, target, report)
        if mapped is None:
            report.new.append(key)
        else:
            loaded[key] = mapped
            report.mapped.append(key)
    report.unused = [k for k in source_state if k not in used]
    if not loaded:
        raise StateError(f"model.kwargs.init_from={path}: no weight of that checkpoint fits this model",
                         hint="check that it is a State Transition checkpoint of a compatible model")
    model.load_state_dict(loaded, strict=False)
    return report
