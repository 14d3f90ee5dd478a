"""Combinatorial perturbations: a label made of parts (``KLF1+CEBPA``) encoded from its parts.

With ``model.kwargs.pert_combination=additive`` a perturbation label is split at
``data.kwargs.combination_separator`` (``+`` by default) into its parts, and its vector is the sum
of its parts' vectors: their one-hot columns over the *part* vocabulary, or their rows of
``data.kwargs.perturbation_features_file``. The control label never counts as a part (GEARS/Norman
write singles as ``KLF1+ctrl``), and the control label itself keeps a column of its own, as in
cell-load's one-hot map. So ``A+B`` shares what the model learnt about ``A`` and ``B``, and a
combination never seen in training is encoded as soon as each of its parts was seen.

:func:`encode` (labels -> parts -> multi-hot matrix over the part vocabulary) is the one encoder:
the data module's perturbation map (:func:`apply_to_data_module`, used by cell-load's loader and the
fast loader alike) and ``tx infer`` (:func:`compose`) both call it. The default, ``none``, leaves
cell-load's map untouched, so ``model=state`` stays arc-state's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from state.utils.errors import StateError

log = logging.getLogger(__name__)

MODE_KEY = "pert_combination"  # model.kwargs
SEPARATOR_KEY = "combination_separator"  # data.kwargs (copied into the model's kwargs when on)
DEFAULT_SEPARATOR = "+"
MODES = ("none", "additive")


@dataclass(frozen=True)
class Combinations:
    """How labels split into parts."""

    separator: str
    control: str

    def parts(self, label: Any) -> tuple[str, ...]:
        """The parts of ``label`` in their order, without the control label (control -> ())."""
        label = str(label)
        if label == self.control:
            return ()
        pieces = [p.strip() for p in label.split(self.separator)] if self.separator else [label]
        return tuple(p for p in pieces if p and p != self.control)

    def is_combination(self, label: Any) -> bool:
        return len(self.parts(label)) >= 2


def parse_mode(value: Any) -> str:
    mode = "none" if value is None else str(value).strip().lower()
    if mode not in MODES:
        raise StateError(f"model.kwargs.{MODE_KEY}={value!r} is not one of {', '.join(MODES)}",
                         hint=f"use model.kwargs.{MODE_KEY}=additive (combinations from their parts) or none")
    return mode


def settings(model_kwargs: Mapping[str, Any] | None, data_kwargs: Mapping[str, Any] | None,
             control: Any = None) -> Combinations | None:
    """The combination settings of a config, or None when ``pert_combination`` is ``none``."""
    model_kwargs, data_kwargs = model_kwargs or {}, data_kwargs or {}
    if parse_mode(model_kwargs.get(MODE_KEY)) == "none":
        return None
    separator = data_kwargs.get(SEPARATOR_KEY, model_kwargs.get(SEPARATOR_KEY)) or DEFAULT_SEPARATOR
    control = control if control is not None else data_kwargs.get("control_pert", model_kwargs.get("control_pert"))
    return Combinations(separator=str(separator), control=str(control))


def settings_from_config(cfg: Mapping[str, Any] | None) -> Combinations | None:
    """From a run's config.yaml (``model.kwargs`` and ``data.kwargs``)."""
    cfg = cfg or {}
    return settings((cfg.get("model") or {}).get("kwargs"), (cfg.get("data") or {}).get("kwargs"))


def settings_from_hparams(hparams: Mapping[str, Any]) -> Combinations | None:
    """From a model's hyper-parameters (``pert_combination``, ``combination_separator``, ``control_pert``)."""
    return settings(hparams, None, control=hparams.get("control_pert"))


def part_vocabulary(labels: Iterable[Any], comb: Combinations) -> list[str]:
    """Every part of ``labels``, plus the control label (its own column), sorted."""
    parts = {comb.control}
    for label in labels:
        parts.update(comb.parts(label))
    return sorted(parts)


def encode(labels: Iterable[Any], comb: Combinations, vocabulary: list[str] | None = None,
           features: Mapping[str, Any] | None = None) -> torch.Tensor:
    """[n labels, width]: each label's parts' one-hot columns over ``vocabulary`` summed (the
    control label: its own column), or, with ``features``, the sum of the parts' feature rows.
    A part outside the vocabulary / features is refused by name."""
    labels = [str(x) for x in labels]
    if features is not None:
        table = {str(k): torch.as_tensor(v, dtype=torch.float32).reshape(-1) for k, v in features.items()}
        width = len(next(iter(table.values())))
    else:
        vocabulary = vocabulary if vocabulary is not None else part_vocabulary(labels, comb)
        column = {p: i for i, p in enumerate(vocabulary)}
        width = len(vocabulary)
    out = torch.zeros(len(labels), width)
    missing: set[str] = set()
    for i, label in enumerate(labels):
        for part in comb.parts(label) or (comb.control,):
            if features is not None:
                row = table.get(part)
                if row is None:
                    missing.add(part)
                else:
                    out[i] += row
            elif part in column:
                out[i, column[part]] += 1.0
            else:
                missing.add(part)
    if missing:
        raise StateError(f"unknown perturbation part(s): {', '.join(sorted(missing))}",
                         hint="every part of a combination must be a perturbation the model was trained with")
    return out


def combination_map(labels: Iterable[Any], comb: Combinations,
                    features: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The perturbation map (label -> vector) for the data module and the run directory: every label
    encoded from its parts, plus one entry per part, so that a run directory alone tells ``infer``
    every part it may compose an unseen combination from."""
    labels = [str(x) for x in labels]
    if features is not None:
        known = {str(k) for k in features}
        absent = sorted({p for lab in labels for p in comb.parts(lab)} - known)
        if absent:
            width = len(torch.as_tensor(next(iter(features.values()))).reshape(-1))
            log.warning("%d perturbation part(s) have no row in perturbation_features_file and are encoded as "
                        "zeros: %s", len(absent), ", ".join(absent[:10]))
            features = {**dict(features), **{p: torch.zeros(width) for p in absent}}
        # rows of the file that are themselves combinations are composed too, not trusted as given
        vocabulary = sorted({p for p in known if not comb.is_combination(p)} | {p for lab in labels
                                                                              for p in comb.parts(lab)})
        features = {p: features[p] for p in vocabulary if p in features}
    else:
        vocabulary = part_vocabulary(labels, comb)
    names = list(dict.fromkeys([*labels, *vocabulary]))
    matrix = encode(names, comb, vocabulary, features)
    return {name: matrix[i] for i, name in enumerate(names)}


def apply_to_data_module(dm: Any, comb: Combinations | None) -> None:
    """Replace cell-load's perturbation map by the combination map (before ``setup()`` builds the
    datasets, which read the map). Nothing happens when ``comb`` is None."""
    if comb is None or not getattr(dm, "pert_onehot_map", None):
        return
    features = dm.pert_onehot_map if getattr(dm, "perturbation_features_file", None) else None
    labels = [str(k) for k in dm.pert_onehot_map]  # with a features file: its rows and the data's labels
    dm.pert_onehot_map = combination_map(labels, comb, features)
    n_comb = sum(comb.is_combination(k) for k in labels)
    log.info("perturbations encoded from their parts (separator '%s'): %d labels, %d combinations, width %d",
             comb.separator, len(labels), n_comb, len(next(iter(dm.pert_onehot_map.values()))))


def compose(label: str, pert_map: Mapping[str, np.ndarray], comb: Combinations) -> np.ndarray:
    """The vector of ``label`` from a stored map: the label's own entry, else the sum of its parts'.
    Unknown parts are refused by name (one line)."""
    if label in pert_map:
        return np.asarray(pert_map[label], dtype=np.float32)
    unknown = unknown_parts(label, pert_map, comb)
    if unknown:
        raise StateError(f"perturbation '{label}' has part(s) the model never saw: {', '.join(unknown)}",
                         hint="predict only combinations whose every part the model was trained with")
    return np.sum([np.asarray(pert_map[p], dtype=np.float32) for p in comb.parts(label)], axis=0)


def unknown_parts(label: str, known: Iterable[str] | Mapping[str, Any], comb: Combinations) -> list[str]:
    known = set(known)
    parts = comb.parts(label)
    return sorted({p for p in parts if p not in known}) if parts else ([] if label in known else [label])


def refuse_unknown_parts(unknown: list[str], predictor: Any, *, unknown_as_control: bool) -> list[str]:
    """For ``tx infer``: of the labels the map lacks, those composable from known parts are fine; any
    other combination is refused in one line naming its unknown parts (unless the user asked for
    unknown labels to be simulated as control). Returns the labels still unknown."""
    comb: Combinations = predictor.combinations
    left = [label for label in unknown if not predictor.composable(label)]
    if left and not unknown_as_control:
        missing = sorted({p for label in left for p in unknown_parts(label, predictor.pert_map, comb)})
        shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
        raise StateError(f"perturbation part(s) unknown to the model: {', '.join(missing[:20])} (in {shown})",
                         hint="a combination can be predicted when every part was seen in training; drop those "
                              "labels or pass --unknown-as-control to simulate them with the control vector")
    return left
