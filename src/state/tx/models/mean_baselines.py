"""The two statistics baselines: ``perturb_mean`` (alias GlobalSimpleSum) and ``context_mean`` (CellTypeMean).

Neither learns weights. At the start of ``fit`` they read the whole training split once and keep
per-perturbation / per-cell-type means; ``train`` then runs a single optimizer step (the gene decoder,
if any, is the only trainable part). The statistics travel in the checkpoint at top level, as numpy
arrays, under arc-state's keys, so checkpoints are interchangeable both ways:

* perturb_mean: ``global_basal`` (mean over cell types of the control mean) and ``pert_mean_offsets``
  {perturbation: mean over cell types of (perturbation mean - control mean)}; control offset 0.
  Prediction per cell: its paired control + the offset of its perturbation (unknown -> 0).
* context_mean: ``celltype_pert_means`` {cell type: mean of its perturbed cells (control mean when it
  has none)}. Prediction: control cells copy their own target; others get their cell type's mean.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from state.tx.combinations import settings_from_hparams
from state.tx.models.base import PerturbationModel
from state.tx.models.combination_parts import offsets_for
from state.utils.errors import StateError

log = logging.getLogger(__name__)


class _GroupSums:
    """Running float64 sums and counts of feature vectors keyed by (cell type, perturbation)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str], np.ndarray] = {}
        self.counts: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, cell_types: Iterable[str], perts: Iterable[str], values: torch.Tensor) -> None:
        values = values.detach().to("cpu", torch.float64).numpy()
        values = values.reshape(-1, values.shape[-1])
        keys = [(str(c), str(p)) for c, p in zip(cell_types, perts)]
        unique = sorted(set(keys))
        code = {key: i for i, key in enumerate(unique)}
        inverse = np.fromiter((code[k] for k in keys), dtype=np.int64, count=len(keys))
        totals = np.zeros((len(unique), values.shape[1]))
        np.add.at(totals, inverse, values)
        counts = np.bincount(inverse, minlength=len(unique))
        for key, total, count in zip(unique, totals, counts):
            self.sums[key] = self.sums[key] + total if key in self.sums else total
            self.counts[key] += int(count)

    def mean(self, key: tuple[str, str]) -> np.ndarray:
        return self.sums[key] / self.counts[key]

    def mean_over(self, keys: list[tuple[str, str]]) -> np.ndarray:
        total = sum(self.sums[k] for k in keys)
        return total / sum(self.counts[k] for k in keys)


class _MeanBaseline(PerturbationModel):
    """Shared parts: a dummy parameter (Lightning needs one to step), the statistics pass, losses."""

    statistics_keys: tuple[str, ...] = ()

    def __init__(self, *, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(dropout=dropout, **kwargs)
        self.dummy_param = nn.Parameter(torch.zeros(1))
        self._fitted = False

    # ------------------------------------------------------------------ statistics
    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise StateError(f"{type(self).__name__} computes its statistics from a data module; "
                             "fit it with trainer.fit(model, datamodule=...)")
        sums = _GroupSums()
        n_batches = 0
        with torch.no_grad():
            for batch in datamodule.train_dataloader():
                batch = self.normalize_batch(batch)
                sums.add(batch["cell_type"], batch["pert_name"], batch["pert_cell_emb"])
                n_batches += 1
        if not sums.sums:
            raise StateError("the training split holds no cells; cannot compute baseline statistics")
        self.set_statistics(self.compute_statistics(sums))
        log.info("%s: statistics from %d training batches", type(self).__name__, n_batches)

    def compute_statistics(self, sums: _GroupSums) -> dict[str, Any]:
        raise NotImplementedError

    def set_statistics(self, stats: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.statistics())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        present = [k for k in self.statistics_keys if k in checkpoint]
        if present:
            self.set_statistics({k: checkpoint[k] for k in present})

    def statistics(self) -> dict[str, Any]:
        raise NotImplementedError

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise StateError(f"{type(self).__name__} has no statistics yet: train it or load a checkpoint")

    def _rows(self, batch: Mapping[str, Any], key: str) -> torch.Tensor:
        value = batch[key]
        return value.reshape(-1, value.shape[-1]).to(self.device, torch.float32)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        # Keeps the graph attached to a parameter when there is no decoder to train.
        return loss + 0.0 * self.dummy_param.sum()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        preds = self(batch, padded=True)
        loss = nn.functional.mse_loss(preds, self._rows(batch, "pert_cell_emb"))
        self.log("val_loss", loss, prog_bar=True, batch_size=preds.shape[0], sync_dist=True)
        return loss


class PerturbMeanPerturbationModel(_MeanBaseline):
    """Control cell + the average shift its perturbation causes across cell types."""

    statistics_keys = ("global_basal", "pert_mean_offsets")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.global_basal: np.ndarray | None = None
        self.pert_mean_offsets: dict[str, np.ndarray] = {}
        self._offset_index: dict[str, int] = {}
        self.register_buffer("_offset_table", torch.zeros(1, self.output_dim), persistent=False)
        self.combinations = settings_from_hparams(self._hparam_record)  # None unless pert_combination=additive
        self._combination_cache: dict[str, Any] = {}

    def compute_statistics(self, sums: _GroupSums) -> dict[str, Any]:
        control = str(self.control_pert)
        ctrl_means = {ct: sums.mean((ct, p)) for ct, p in sums.sums if p == control}
        if not ctrl_means:
            raise StateError(f"no control cells ('{control}') in the training split; perturb_mean needs them")
        deltas: dict[str, list[np.ndarray]] = defaultdict(list)
        for ct, pert in sums.sums:
            if pert != control and ct in ctrl_means:
                deltas[pert].append(sums.mean((ct, pert)) - ctrl_means[ct])
        offsets = {p: np.mean(d, axis=0).astype(np.float32) for p, d in sorted(deltas.items())}
        offsets[control] = np.zeros_like(next(iter(ctrl_means.values())), dtype=np.float32)
        basal = np.mean(list(ctrl_means.values()), axis=0).astype(np.float32)
        return {"global_basal": basal, "pert_mean_offsets": offsets}

    def set_statistics(self, stats: Mapping[str, Any]) -> None:
        if stats.get("global_basal") is not None:
            self.global_basal = np.asarray(stats["global_basal"], dtype=np.float32)
        if "pert_mean_offsets" in stats:
            offsets = {str(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in stats["pert_mean_offsets"].items()}
            self.pert_mean_offsets = offsets
            names = list(offsets)
            self._offset_index = {name: i + 1 for i, name in enumerate(names)}  # row 0 = unknown -> 0
            width = len(next(iter(offsets.values()))) if offsets else self.output_dim
            table = np.zeros((len(names) + 1, width), dtype=np.float32)
            for name, i in self._offset_index.items():
                table[i] = offsets[name]
            self._offset_table = torch.from_numpy(table).to(self._offset_table.device)
            self._fitted = True

    def statistics(self) -> dict[str, Any]:
        return {"global_basal": self.global_basal, "pert_mean_offsets": dict(self.pert_mean_offsets)}

    def forward(self, batch: Mapping[str, Any], padded: bool = True) -> torch.Tensor:
        self._require_fitted()
        basal = self._rows(batch, "ctrl_cell_emb")  # [N, D]
        index = torch.tensor([self._offset_index.get(str(p), 0) for p in batch["pert_name"]],
                             device=self._offset_table.device)
        shift = self._offset_table[index].to(basal.device)
        if self.combinations is not None:  # an unseen combination: the sum of its parts' offsets
            extra = offsets_for(batch["pert_name"], self.pert_mean_offsets, self.combinations, self._combination_cache)
            for i, name in enumerate(batch["pert_name"]):
                if str(name) in extra:
                    shift[i] = torch.from_numpy(extra[str(name)]).to(shift)
        return basal + shift  # [N, D]


class ContextMeanPerturbationModel(_MeanBaseline):
    """Each cell type's mean perturbed profile; control cells are returned unchanged."""

    statistics_keys = ("celltype_pert_means",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.celltype_pert_means: dict[str, np.ndarray] = {}
        self._means: dict[str, torch.Tensor] = {}

    def compute_statistics(self, sums: _GroupSums) -> dict[str, Any]:
        control = str(self.control_pert)
        means: dict[str, np.ndarray] = {}
        for ct in sorted({ct for ct, _ in sums.sums}):
            perturbed = [(c, p) for c, p in sums.sums if c == ct and p != control]
            keys = perturbed or [(c, p) for c, p in sums.sums if c == ct]
            means[ct] = sums.mean_over(keys).astype(np.float32)
        return {"celltype_pert_means": means}

    def set_statistics(self, stats: Mapping[str, Any]) -> None:
        means = stats.get("celltype_pert_means") or {}
        self.celltype_pert_means = {str(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in means.items()}
        self._means = {k: torch.from_numpy(v) for k, v in self.celltype_pert_means.items()}
        self._fitted = bool(self._means)

    def statistics(self) -> dict[str, Any]:
        return {"celltype_pert_means": dict(self.celltype_pert_means)}

    def forward(self, batch: Mapping[str, Any], padded: bool = True) -> torch.Tensor:
        self._require_fitted()
        cell_types = [str(c) for c in batch["cell_type"]]
        unknown = sorted(set(cell_types) - set(self._means))
        if unknown:
            raise StateError(f"context_mean has no statistics for cell type(s) {', '.join(unknown)}; "
                             f"it knows {', '.join(sorted(self._means))}")
        own_key = "pert_cell_emb" if batch.get("pert_cell_emb") is not None else "ctrl_cell_emb"
        own = self._rows(batch, own_key)  # [N, D]
        means = torch.stack([self._means[c] for c in cell_types]).to(own.device)  # [N, D]
        is_control = torch.tensor([str(p) == str(self.control_pert) for p in batch["pert_name"]],
                                  device=own.device)
        return torch.where(is_control[:, None], own, means)
