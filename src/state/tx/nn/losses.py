"""Set-level training losses of the State Transition model.

Every loss compares a predicted set with the observed set of the same (cell type,
perturbation): inputs are [B, S, D] tensors and the result is one value per set, [B]. The
distributional losses come from geomloss (``SamplesLoss``), which treats each set as a point cloud,
so cell order inside a set does not matter.

``loss`` (model.kwargs) picks the objective:
* ``energy``: ``SamplesLoss(distributional_loss, blur)`` (distributional_loss names the geomloss
  kernel: energy, sinkhorn, gaussian, laplacian, ...);
* ``sinkhorn``: ``SamplesLoss("sinkhorn", blur)``;
* ``se``: ``sinkhorn_weight * sinkhorn + energy_weight * energy`` (both terms are reported);
* ``mse``: mean squared error per set.
``mmd_num_chunks > 1`` splits the feature axis into that many chunks, computes the loss per chunk
and averages (ignoring NaNs); with ``randomize_mmd_chunks`` the features are shuffled into chunks
afresh at every training step.

Every term runs in float32 with autocast off, whatever the Trainer's precision (see
:mod:`state.utils.loss_numerics`: under bf16 the distance matmul cancels badly); the geomloss terms
also centre each pair of sets first, which leaves distances unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from state.utils.errors import StateError
from state.utils.loss_numerics import CentredSamplesLoss, as_float32, autocast_off

LOSS_NAMES = ("energy", "sinkhorn", "se", "mse")


class _MSEPerSet(nn.Module):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((pred - target) ** 2).mean(dim=(-2, -1))  # [B]


class SetLoss(nn.Module):
    """Per-set loss [B, S, D] x [B, S, D] -> dict of [B] tensors (``total`` + named terms)."""

    def __init__(
        self,
        loss: str = "energy",
        *,
        distributional_loss: str = "energy",
        blur: float = 0.05,
        sinkhorn_weight: float = 0.01,
        energy_weight: float = 1.0,
        num_chunks: int = 1,
        randomize_chunks: bool = False,
    ) -> None:
        super().__init__()
        self.kind = str(loss)
        self.sinkhorn_weight = float(sinkhorn_weight)
        self.energy_weight = float(energy_weight)
        self.num_chunks = max(int(num_chunks or 1), 1)
        self.randomize_chunks = bool(randomize_chunks)
        if self.kind == "energy":
            self.terms = nn.ModuleDict({"total": CentredSamplesLoss(loss=distributional_loss, blur=blur)})
        elif self.kind == "sinkhorn":
            self.terms = nn.ModuleDict({"total": CentredSamplesLoss(loss="sinkhorn", blur=blur)})
        elif self.kind == "se":
            self.terms = nn.ModuleDict(
                {
                    "sinkhorn": CentredSamplesLoss(loss="sinkhorn", blur=blur),
                    "energy": CentredSamplesLoss(loss="energy", blur=blur),
                }
            )
        elif self.kind == "mse":
            self.terms = nn.ModuleDict({"total": _MSEPerSet()})
        else:
            raise StateError(
                f"unknown loss '{loss}'", hint=f"set model.kwargs.loss to one of {', '.join(LOSS_NAMES)}"
            )

    def _unchunked(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        values = {name: fn(pred, target) for name, fn in self.terms.items()}  # each [B]
        if self.kind == "se":
            values["total"] = (
                self.sinkhorn_weight * values["sinkhorn"] + self.energy_weight * values["energy"]
            )
        return values

    def components(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """All terms, each [B]; ``total`` is the objective (float32 or wider, autocast off)."""
        with autocast_off(pred.device.type):
            return self._components(*as_float32(pred, target))

    def _components(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.num_chunks == 1:
            return self._unchunked(pred, target)
        n_features = pred.shape[-1]
        if self.randomize_chunks and self.training:
            order = torch.randperm(n_features, device=pred.device)
        else:
            order = torch.arange(n_features, device=pred.device)
        per_chunk = [
            self._unchunked(pred[..., idx], target[..., idx])
            for idx in torch.tensor_split(order, min(self.num_chunks, n_features))
        ]
        return {name: torch.stack([c[name] for c in per_chunk]).nanmean(dim=0) for name in per_chunk[0]}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.components(pred, target)["total"]  # [B]
