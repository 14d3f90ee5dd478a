"""``decoder_only`` baseline: the latent prediction IS the observed latent; only the gene decoder learns.

It measures how well expression can be recovered from the embedding alone. Prediction:
``preds = pert_cell_emb`` (in ``infer``: the cell's own features), so the latent is perfect by
construction and all error is the decoder's. Training: the gene decoder maps ``pert_cell_emb`` sets
[B, S, D] to expression and is scored against ``pert_cell_counts`` with the set loss of
``loss``/``distributional_loss`` (S = the set length the data loader uses, saved as ``cell_set_len``).
``train_loss`` is logged as 0 (the latent loss), ``decoder_loss`` and ``val_loss`` are the decoder's
set loss. Without expression targets (e.g. ``embed_key=X_hvg`` with ``output_space=gene``) there is
nothing to train and every loss is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from state.tx.config.architecture import TransitionConfig
from state.tx.models.base import PerturbationModel
from state.tx.models.zoo_common import NamedCheckpointMixin, flat_rows
from state.tx.nn.losses import SetLoss

DEFAULT_SET_LEN = 512  # the GPT2 template's cell_set_len


class DecoderOnlyPerturbationModel(NamedCheckpointMixin, PerturbationModel):
    zoo_name = "decoder_only"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cell_set_len = TransitionConfig.from_hparams(kwargs, default_set_len=DEFAULT_SET_LEN).set_len
        self.set_loss = SetLoss(str(kwargs.get("loss", "energy")),
                                distributional_loss=str(kwargs.get("distributional_loss", "energy")),
                                blur=float(kwargs.get("blur", 0.05)))
        # Lightning needs a parameter to step even when there is no decoder.
        self.dummy_param = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Mapping[str, Any], padded: bool = True) -> torch.Tensor:
        key = "pert_cell_emb" if batch.get("pert_cell_emb") is not None else "ctrl_cell_emb"
        return flat_rows(batch, key, like=self.dummy_param)  # [N, D]

    def _decoder_loss(self, batch: Mapping[str, Any], *, padded: bool) -> torch.Tensor:
        zero = 0.0 * self.dummy_param.sum()
        if self.gene_decoder is None or batch.get("pert_cell_counts") is None:
            return zero
        latent = self(batch)
        counts = flat_rows(batch, "pert_cell_counts", like=latent)
        n_sets = latent.shape[0] // self.cell_set_len if padded and latent.shape[0] % self.cell_set_len == 0 else 1
        decoded = self.gene_decoder(latent.reshape(n_sets, -1, latent.shape[-1]))  # [B, S, G]
        return self.set_loss(decoded, counts.reshape(n_sets, -1, counts.shape[-1])).nanmean() + zero

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._decoder_loss(batch, padded=True)
        n_cells = len(batch["pert_name"])
        self.log("train_loss", 0.0, prog_bar=True, batch_size=n_cells)
        self.log("decoder_loss", loss, batch_size=n_cells)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._decoder_loss(batch, padded=True)
        self.log("val_loss", loss, prog_bar=True, batch_size=len(batch["pert_name"]), sync_dist=True)
        return loss
