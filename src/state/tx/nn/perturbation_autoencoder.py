"""The latent perturbation autoencoder shared by the scVI and CPA baselines (plain ``nn.Module``).

    cell x [N, D] --encoder--> z_basal [N, L]  (a Gaussian posterior when variational)
    z = z_basal + pert_embedding(pert vector) + batch_embedding(batch)   [N, L]
    z --decoder--> hidden --likelihood head--> distribution over the D outputs

Training reconstructs a perturbed cell from its own latent and perturbation; prediction encodes a
control cell and adds the embedding of the perturbation asked for (CPA's counterfactual). CPA adds
adversarial classifiers on ``z_basal`` (:func:`make_classifier`) so that it holds no perturbation
or batch information.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from state.tx.nn.distributions import LikelihoodHead

NORM_SETTINGS = ("both", "encoder", "decoder", "none")


def uses_norm(setting: str | None, part: str) -> bool:
    """Whether ``part`` (encoder/decoder) gets a norm layer under a ``use_*_norm`` setting."""
    return str(setting).lower() in ("both", part, "true")


def hidden_stack(
    in_dim: int,
    hidden_dim: int,
    *,
    n_layers: int,
    batch_norm: bool = False,
    layer_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """``n_layers`` blocks of [Linear, (BatchNorm), (LayerNorm), ReLU, Dropout]; output width hidden_dim."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(max(int(n_layers), 1)):
        layers.append(nn.Linear(width, hidden_dim))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim, momentum=0.01, eps=1e-3))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden_dim, elementwise_affine=False))
        layers += [nn.ReLU(), nn.Dropout(dropout)]
        width = hidden_dim
    return nn.Sequential(*layers)


def make_classifier(in_dim: int, n_classes: int, *, hidden_dim: int, n_layers: int, norm: str | None,
                    dropout: float) -> nn.Sequential:
    """An MLP classifier (CPA's adversary): hidden stack + Linear to logits."""
    trunk = hidden_stack(in_dim, hidden_dim, n_layers=n_layers, batch_norm=norm == "batch",
                         layer_norm=norm == "layer", dropout=dropout)
    return nn.Sequential(*trunk, nn.Linear(hidden_dim, n_classes))


@dataclass
class AutoencoderOutput:
    z_basal: torch.Tensor  # [N, L] sampled (or deterministic) basal latent
    params: dict[str, torch.Tensor]  # likelihood parameters, each [N, D]
    kl: torch.Tensor  # [N] KL(q(z|x) || N(0, I)); zeros when not variational


class PerturbationAutoencoder(nn.Module):
    """Encoder, perturbation / batch embeddings and a likelihood decoder (see module docstring)."""

    def __init__(
        self,
        *,
        input_dim: int,
        output_dim: int,
        pert_dim: int,
        batch_dim: int | None,
        n_latent: int,
        n_hidden_encoder: int,
        n_layers_encoder: int,
        n_hidden_decoder: int,
        n_layers_decoder: int,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        dropout_rate_encoder: float = 0.1,
        dropout_rate_decoder: float = 0.1,
        variational: bool = True,
        likelihood: str = "zinb",
    ) -> None:
        super().__init__()
        self.variational = bool(variational)
        self.encoder = hidden_stack(
            input_dim, n_hidden_encoder, n_layers=n_layers_encoder, dropout=dropout_rate_encoder,
            batch_norm=uses_norm(use_batch_norm, "encoder"), layer_norm=uses_norm(use_layer_norm, "encoder"),
        )
        self.z_mean = nn.Linear(n_hidden_encoder, n_latent)
        self.z_logvar = nn.Linear(n_hidden_encoder, n_latent) if self.variational else None
        self.pert_embedding = nn.Linear(pert_dim, n_latent, bias=False)
        self.batch_embedding = nn.Embedding(int(batch_dim), n_latent) if batch_dim else None
        self.decoder = hidden_stack(
            n_latent, n_hidden_decoder, n_layers=n_layers_decoder, dropout=dropout_rate_decoder,
            batch_norm=uses_norm(use_batch_norm, "decoder"), layer_norm=uses_norm(use_layer_norm, "decoder"),
        )
        self.likelihood = LikelihoodHead(n_hidden_decoder, output_dim, kind=likelihood)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Basal latent [N, L] and its KL term [N]."""
        hidden = self.encoder(x)  # [N, H_enc]
        mean = self.z_mean(hidden)  # [N, L]
        if self.z_logvar is None:
            return mean, mean.new_zeros(mean.shape[0])
        logvar = self.z_logvar(hidden).clamp(-12.0, 12.0)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)  # [N]
        return z, kl

    def decode(self, z_basal: torch.Tensor, pert: torch.Tensor, batch_index: torch.Tensor | None,
               library: torch.Tensor | None) -> dict[str, torch.Tensor]:
        z = z_basal + self.pert_embedding(pert)  # [N, L]
        if self.batch_embedding is not None and batch_index is not None:
            z = z + self.batch_embedding(batch_index)
        return self.likelihood(self.decoder(z), library)

    def forward(self, x: torch.Tensor, pert: torch.Tensor, batch_index: torch.Tensor | None = None,
                library: torch.Tensor | None = None) -> AutoencoderOutput:
        z_basal, kl = self.encode(x)
        return AutoencoderOutput(z_basal=z_basal, params=self.decode(z_basal, pert, batch_index, library), kl=kl)
