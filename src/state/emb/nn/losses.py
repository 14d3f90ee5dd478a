"""Training losses of the SE model, as plain functions and modules.

Every loss takes decoder scores ``pred`` and targets ``target`` of shape [cells, genes] (the
P + N (+ S) task genes of each cell) and returns a scalar tensor. ``build_loss`` maps arc-state's
``loss.name`` values to these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _energy_loss(kernel: str = "energy", **kwargs) -> nn.Module:
    # float32 with autocast off and each pair centred: bf16 distances cancel (state.utils.loss_numerics).
    # Imported lazily: only training needs geomloss.
    from state.utils.loss_numerics import CentredSamplesLoss

    return CentredSamplesLoss(kernel, **kwargs)


def read_depth(targets: torch.Tensor) -> torch.Tensor:
    """Per-cell read depth: mean of the non-zero targets, 0 for a cell without any. [cells]."""
    nonzero = targets != 0
    total = torch.where(nonzero, targets, torch.zeros_like(targets)).sum(dim=1)
    count = nonzero.sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _nanmean(values: torch.Tensor) -> torch.Tensor:
    """Mean over finite terms; 0 (still differentiable) when there are none.

    Computed without asking the device anything (no ``if finite.any()``, no boolean indexing, both
    of which make the host wait for the GPU on every training step).
    """
    finite = torch.isfinite(values)
    total = torch.where(finite, values, torch.zeros_like(values)).sum()
    return total / finite.sum().clamp(min=1)


class TabularLoss(nn.Module):
    """arc-state's default ``tabular`` loss: two energy distances (geomloss ``SamplesLoss("energy")``).

    Scores and targets [cells, genes] are viewed as [cells / downsample, downsample, genes].
    (a) per cell group: energy distance between predicted and target point clouds (points =
        the ``downsample`` copies, dimension = genes);
    (b) per shared gene: the last ``shared`` columns transposed to [shared, downsample, cell
        groups], i.e. an energy distance across cells for each of the genes all cells share.
    Each term is averaged over its batch with NaN terms skipped; the result is (a) + (b).
    """

    def __init__(self, shared: int = 128, downsample: int = 1) -> None:
        super().__init__()
        self.shared = int(shared)
        self.downsample = max(int(downsample), 1)
        self.cell_loss = _energy_loss("energy")
        self.shared_gene_loss = _energy_loss("energy")

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        genes = pred.shape[-1]
        pred = pred.reshape(-1, self.downsample, genes).float()
        target = target.reshape(-1, self.downsample, genes).float()
        loss = _nanmean(self.cell_loss(pred, target))
        if self.shared > 0:
            shared_pred = pred[:, :, -self.shared :].permute(2, 1, 0).contiguous()
            shared_target = target[:, :, -self.shared :].permute(2, 1, 0).contiguous()
            loss = loss + _nanmean(self.shared_gene_loss(shared_pred, shared_target))
        return loss


class MMDLoss(nn.Module):
    """``loss.name: mmd``: geomloss ``SamplesLoss(kernel, blur=0.05, scaling=0.5)`` on the same view."""

    def __init__(self, kernel: str = "energy", downsample: int = 1) -> None:
        super().__init__()
        self.downsample = max(int(downsample), 1)
        self.samples_loss = _energy_loss(kernel, blur=0.05, scaling=0.5)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        genes = pred.shape[-1]
        pred = pred.reshape(-1, self.downsample, genes).float()
        target = target.reshape(-1, self.downsample, genes).float()
        return _nanmean(self.samples_loss(pred, target))


def cross_entropy_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``loss.name: cross_entropy``: BCE with logits against binarised (0/1) targets."""
    return F.binary_cross_entropy_with_logits(pred.float(), (target > 0).float())


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``loss.name: mse``."""
    return F.mse_loss(pred.float(), target.float())


def wasserstein_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``loss.name: wasserstein``: L1 distance between the softmax CDFs over genes, mean over cells."""
    pred_cdf = torch.cumsum(torch.softmax(pred.float(), dim=-1), dim=-1)
    target_cdf = torch.cumsum(torch.softmax(target.float(), dim=-1), dim=-1)
    return (pred_cdf - target_cdf).abs().sum(dim=-1).mean()


def kl_divergence_loss(pred: torch.Tensor, target: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """``loss.name: kl_divergence``: KL(target distribution || predicted distribution) per cell.

    With ``normalize`` the targets are turned into a distribution with softmax; otherwise they are
    taken as probabilities already.
    """
    log_pred = torch.log_softmax(pred.float(), dim=-1)
    target_prob = torch.softmax(target.float(), dim=-1) if normalize else target.float()
    return F.kl_div(log_pred, target_prob, reduction="batchmean")


def dataset_loss(dataset_logits: torch.Tensor, dataset_index: torch.Tensor) -> torch.Tensor:
    """Training-only dataset-classification term (added when ``model.dataset_correction``)."""
    return F.cross_entropy(dataset_logits.float(), dataset_index.long())


class _FunctionLoss(nn.Module):
    def __init__(self, fn, **kwargs) -> None:
        super().__init__()
        self.fn = fn
        self.kwargs = kwargs

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(pred, target, **self.kwargs)


LOSS_NAMES = ("tabular", "cross_entropy", "mse", "wasserstein", "kl_divergence", "mmd")


def build_loss(
    name: str, *, shared: int = 512, downsample: int = 1, kernel: str = "energy", normalization: bool = True
) -> nn.Module:
    """Loss module for arc-state's ``loss.name`` (``downsample`` = ``model.num_downsample`` in training)."""
    if name == "tabular":
        return TabularLoss(shared=shared, downsample=downsample)
    if name == "mmd":
        return MMDLoss(kernel=kernel, downsample=downsample)
    if name == "cross_entropy":
        return _FunctionLoss(cross_entropy_loss)
    if name == "mse":
        return _FunctionLoss(mse_loss)
    if name == "wasserstein":
        return _FunctionLoss(wasserstein_loss)
    if name == "kl_divergence":
        return _FunctionLoss(kl_divergence_loss, normalize=normalization)
    raise ValueError(f"unknown loss.name {name!r}; expected one of {', '.join(LOSS_NAMES)}")


__all__ = [
    "LOSS_NAMES",
    "MMDLoss",
    "TabularLoss",
    "build_loss",
    "cross_entropy_loss",
    "dataset_loss",
    "kl_divergence_loss",
    "mse_loss",
    "read_depth",
    "wasserstein_loss",
]
