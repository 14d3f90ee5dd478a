"""``scVI`` baseline (model=scvi): a variational autoencoder with a ZINB / NB / Gaussian likelihood.

The network is :class:`state.tx.nn.perturbation_autoencoder.PerturbationAutoencoder`. Cells are
treated one by one (a batch is one set of ``cell_sentence_len`` cells, ``train`` forces
``training.batch_size=1``). Training reconstructs each perturbed cell (``pert_cell_emb``) from its
latent plus its perturbation's embedding; the loss is the negative log-likelihood plus a KL term
whose weight grows linearly from 0 to 1 over ``n_epochs_kl_warmup`` training steps. Prediction
encodes the matched control cell (``ctrl_cell_emb``) and decodes it with the target perturbation;
the prediction is the likelihood's mean (for NB/ZINB scaled to the control cell's library size).

Optimiser: Adam(lr, weight_decay=wd) with StepLR every ``step_size_lr`` epochs (training/scvi.yaml).
Logged: ``train_loss``, ``train/recon_loss``, ``train/kl_loss``, ``train/kl_weight``, ``decoder_loss``,
``val_loss`` (reconstruction NLL). :class:`state.tx.models.cpa.CPAPerturbationModel` reuses all of
this and adds its adversaries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from state.tx.models.base import PerturbationModel
from state.tx.models.zoo_common import (
    NamedCheckpointMixin,
    batch_indices,
    decoder_mse,
    flat_rows,
    lightning_optimizer_config,
)
from state.tx.nn.perturbation_autoencoder import AutoencoderOutput, PerturbationAutoencoder
from state.utils.errors import StateError

log = logging.getLogger(__name__)

EXPR_TRANSFORMS = ("none", "log1p")


class ScVIPerturbationModel(NamedCheckpointMixin, PerturbationModel):
    """Latent perturbation autoencoder; defaults are scVI's (variational, ZINB)."""

    honours_optimizer_choice = False  # Adam(lr, training.wd) of its own training file

    zoo_name = "scvi"
    # model.kwargs / training keys this class reads, with the value used when a config omits one.
    settings_defaults: ClassVar[dict[str, Any]] = {
        "n_latent": 84,
        "recon_loss": "zinb",
        "n_hidden_encoder": 512,
        "n_layers_encoder": 2,
        "n_hidden_decoder": 512,
        "n_layers_decoder": 2,
        "use_batch_norm": "both",
        "use_layer_norm": "none",
        "dropout_rate_encoder": 0.1,
        "dropout_rate_decoder": 0.1,
        "variational": True,
        "expr_transform": "none",
        "nb_decoder": False,
        "n_epochs_kl_warmup": None,
        "wd": 0.0,
        "step_size_lr": None,
    }

    def __init__(self, **kwargs: Any) -> None:
        settings = {key: kwargs.pop(key, default) for key, default in self.settings_defaults.items()}
        super().__init__(**kwargs)
        self.add_hparams(settings)
        self.settings = settings
        transform = str(settings["expr_transform"]).lower()
        if transform not in EXPR_TRANSFORMS:
            raise StateError(f"model.kwargs.expr_transform={transform!r} is not one of {', '.join(EXPR_TRANSFORMS)}")
        self.expr_transform = transform
        self.likelihood = "nb" if settings["nb_decoder"] else str(settings["recon_loss"]).lower()
        self.net = PerturbationAutoencoder(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            pert_dim=self.pert_dim,
            batch_dim=self.batch_dim,
            n_latent=int(settings["n_latent"]),
            n_hidden_encoder=int(settings["n_hidden_encoder"]),
            n_layers_encoder=int(settings["n_layers_encoder"]),
            n_hidden_decoder=int(settings["n_hidden_decoder"]),
            n_layers_decoder=int(settings["n_layers_decoder"]),
            use_batch_norm=str(settings["use_batch_norm"]),
            use_layer_norm=str(settings["use_layer_norm"]),
            dropout_rate_encoder=float(settings["dropout_rate_encoder"]),
            dropout_rate_decoder=float(settings["dropout_rate_decoder"]),
            variational=bool(settings["variational"]),
            likelihood=self.likelihood,
        )
        warmup = settings["n_epochs_kl_warmup"]
        self.kl_warmup_steps = float(warmup) if warmup else 0.0

    # ------------------------------------------------------------------ inputs
    def _counts_checked(self, x: torch.Tensor, key: str) -> torch.Tensor:
        if self.likelihood != "gauss" and bool((x < 0).any()):
            raise StateError(
                f"recon_loss={self.likelihood} needs non-negative expression but batch['{key}'] has negative values",
                hint="use model.kwargs.recon_loss=gauss for embeddings, or train on expression (data.kwargs.embed_key=X_hvg)",
            )
        return x

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x.clamp_min(0)) if self.expr_transform == "log1p" else x

    def _library(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.likelihood == "gauss" else x.sum(-1, keepdim=True).clamp_min(1e-4)  # [N, 1]

    def autoencode(self, batch: Mapping[str, Any]) -> tuple[AutoencoderOutput, torch.Tensor]:
        """Reconstruct the perturbed cells: (network output, per-cell NLL [N])."""
        x = self._counts_checked(flat_rows(batch, "pert_cell_emb", like=self), "pert_cell_emb")  # [N, D]
        pert = flat_rows(batch, "pert_emb", like=self)  # [N, P]
        out = self.net(self._encoder_input(x), pert, batch_indices(batch, device=x.device, n_classes=self.batch_dim),
                       self._library(x))
        return out, self.net.likelihood.nll(out.params, x)

    def forward(self, batch: Mapping[str, Any], padded: bool = True) -> torch.Tensor:
        """Counterfactual prediction [N, output_dim]: control cell's latent + the target perturbation."""
        ctrl = self._counts_checked(flat_rows(batch, "ctrl_cell_emb", like=self), "ctrl_cell_emb")  # [N, D]
        pert = flat_rows(batch, "pert_emb", like=self)
        z_basal, _ = self.net.encode(self._encoder_input(ctrl))
        index = batch_indices(batch, device=ctrl.device, n_classes=self.batch_dim)
        params = self.net.decode(z_basal, pert, index, self._library(ctrl))
        return self.net.likelihood.expected(params)

    # ------------------------------------------------------------------ objective
    def kl_weight(self) -> float:
        if not self.kl_warmup_steps:
            return 1.0
        return min(1.0, self.global_step / self.kl_warmup_steps)

    def reconstruction_terms(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """recon (mean NLL), kl, the autoencoder total, the decoder MSE (if any) and the network output."""
        out, nll = self.autoencode(batch)
        terms: dict[str, Any] = {"out": out, "recon": nll.mean(), "kl": out.kl.mean()}
        terms["total"] = terms["recon"] + self.kl_weight() * terms["kl"]
        decoder = decoder_mse(self.gene_decoder, self.net.likelihood.expected(out.params), batch)
        if decoder is not None:
            terms["decoder"] = decoder
        return terms

    def log_reconstruction(self, terms: Mapping[str, Any], n_cells: int) -> None:
        self.log("train_loss", terms["total"], prog_bar=True, batch_size=n_cells)
        self.log("train/recon_loss", terms["recon"], batch_size=n_cells)
        self.log("train/kl_loss", terms["kl"], batch_size=n_cells)
        self.log("train/kl_weight", self.kl_weight(), batch_size=n_cells)
        if "decoder" in terms:
            self.log("decoder_loss", terms["decoder"], batch_size=n_cells)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.reconstruction_terms(batch)
        self.log_reconstruction(terms, n_cells=len(batch["pert_name"]))
        return terms["total"] + terms.get("decoder", 0.0)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, nll = self.autoencode(batch)
        loss = nll.mean()
        self.log("val_loss", loss, prog_bar=True, batch_size=nll.shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self):
        return lightning_optimizer_config(self.parameters(), lr=self.lr, weight_decay=self.settings["wd"],
                                          step_size=self.settings["step_size_lr"])
