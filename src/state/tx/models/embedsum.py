"""``EmbedSum`` baseline (model=embedsum): per-cell MLPs, no attention.

    y = project_out(pert_encoder(pert) + basal_encoder(basal))  (+ basal when predict_residual and the
    input and output spaces have the same width)

Checkpoint keys: ``pert_encoder.*``, ``basal_encoder.*`` (both :func:`build_mlp` with
``n_encoder_layers``), ``project_out.*`` (``n_decoder_layers``) and ``gene_decoder.*``. Loss: MSE
on ``pert_cell_emb`` plus the gene decoder's MSE on detached predictions (the base objective).
Cells are independent, so sets only matter to the data loader (``cell_set_len`` cells each).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from state.tx.models.base import PerturbationModel
from state.tx.models.zoo_common import NamedCheckpointMixin, flat_rows
from state.tx.nn.mlp import activation_class, build_mlp


class EmbedSumNet(nn.Module):
    """Sum of a perturbation encoding and a basal-cell encoding, projected to the output space."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, pert_dim: int, n_encoder_layers: int,
                 n_decoder_layers: int, dropout: float, activation: str, predict_residual: bool) -> None:
        super().__init__()
        mlp = {"hidden_dim": hidden_dim, "dropout": dropout, "activation": activation_class(activation)}
        self.pert_encoder = build_mlp(pert_dim, hidden_dim, n_layers=n_encoder_layers, **mlp)
        self.basal_encoder = build_mlp(input_dim, hidden_dim, n_layers=n_encoder_layers, **mlp)
        self.project_out = build_mlp(hidden_dim, output_dim, n_layers=n_decoder_layers, **mlp)
        self.add_basal = bool(predict_residual) and input_dim == output_dim

    def forward(self, pert: torch.Tensor, basal: torch.Tensor) -> torch.Tensor:
        y = self.project_out(self.pert_encoder(pert) + self.basal_encoder(basal))  # [N, D_out]
        return y + basal if self.add_basal else y


class EmbedSumPerturbationModel(NamedCheckpointMixin, PerturbationModel):
    zoo_name = "embedsum"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        net = EmbedSumNet(
            input_dim=self.input_dim, hidden_dim=self.hidden_dim, output_dim=self.output_dim,
            pert_dim=self.pert_dim, n_encoder_layers=int(kwargs.get("n_encoder_layers", 2)),
            n_decoder_layers=int(kwargs.get("n_decoder_layers", 2)), dropout=self.dropout,
            activation=kwargs.get("activation", "gelu"), predict_residual=bool(kwargs.get("predict_residual", True)),
        )
        # arc-state's keys have no prefix: register the parts on this module.
        self.pert_encoder, self.basal_encoder, self.project_out = net.pert_encoder, net.basal_encoder, net.project_out
        object.__setattr__(self, "net", net)

    def forward(self, batch: Mapping[str, Any], padded: bool = True) -> torch.Tensor:
        return self.net(flat_rows(batch, "pert_emb", like=self), flat_rows(batch, "ctrl_cell_emb", like=self))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        preds = self(batch)
        loss = nn.functional.mse_loss(preds, flat_rows(batch, "pert_cell_emb", like=preds))
        self.log("val_loss", loss, prog_bar=True, batch_size=preds.shape[0], sync_dist=True)
        return loss
