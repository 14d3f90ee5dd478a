"""Small pieces every zoo model (embedsum, decoder_only, pseudobulk, old_neuralot, CPA, scVI, scGPT) shares.

* :class:`NamedCheckpointMixin` writes the registry name at the top of each checkpoint, so
  ``registry.load_model_checkpoint(path)`` finds the class without a run directory.
* batch helpers turn cell-load's flat [N, .] tensors into model inputs;
* :func:`adam_with_step_lr` is the Adam + StepLR schedule of the CPA / scVI / scGPT training files
  (``lr``, ``wd``, ``step_size_lr``; the schedule steps once per epoch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from state.tx.models.entries import MODEL_NAME_KEY

LR_DECAY_PER_STEP = 0.9  # multiplicative decay each ``step_size_lr`` epochs


class NamedCheckpointMixin:
    """Put ``zoo_name`` (a registry name) into every checkpoint this module writes."""

    zoo_name: str = ""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint[MODEL_NAME_KEY] = self.zoo_name


def flat_rows(batch: Mapping[str, Any], key: str, *, like: torch.Tensor | nn.Module) -> torch.Tensor:
    """``batch[key]`` as a float [N, D] tensor on the device / dtype of ``like``."""
    ref = like if isinstance(like, torch.Tensor) else next(like.parameters())
    value = torch.as_tensor(batch[key])
    return value.reshape(-1, value.shape[-1]).to(ref.device, ref.dtype)


def batch_indices(batch: Mapping[str, Any], *, device: torch.device, n_classes: int | None) -> torch.Tensor | None:
    """Batch labels [N] (from one-hot or integer ``batch``), or None when absent or out of range."""
    value = batch.get("batch")
    if value is None or not n_classes:
        return None
    index = torch.as_tensor(value, device=device)
    if index.dim() == 2:  # one-hot [N, C]
        if index.shape[1] != n_classes:
            return None
        index = index.argmax(dim=-1)
    index = index.reshape(-1).long()
    return index if int(index.max()) < n_classes else None


def decoder_mse(gene_decoder: nn.Module | None, preds: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """MSE of the gene decoder on detached predictions (the baselines' decoder objective), or None."""
    counts = batch.get("pert_cell_counts")
    if gene_decoder is None or counts is None:
        return None
    decoded = gene_decoder(preds.detach())
    return nn.functional.mse_loss(decoded, flat_rows(batch, "pert_cell_counts", like=decoded))


def adam_with_step_lr(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float, step_size: Any):
    """Adam with weight decay, plus a per-epoch StepLR when ``step_size`` is set: (optimizer, scheduler|None)."""
    optimizer = torch.optim.Adam(list(params), lr=float(lr), weight_decay=float(weight_decay or 0.0))
    if not step_size:
        return optimizer, None
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(step_size), gamma=LR_DECAY_PER_STEP)
    return optimizer, scheduler


def lightning_optimizer_config(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float, step_size: Any):
    """:func:`adam_with_step_lr` in the form ``configure_optimizers`` returns."""
    optimizer, scheduler = adam_with_step_lr(params, lr=lr, weight_decay=weight_decay, step_size=step_size)
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
