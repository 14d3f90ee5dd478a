"""scGPT-style network for perturbation prediction (plain ``nn.Module``; no scGPT import needed).

A cell is a sequence of tokens, one per gene (plus a leading ``<cls>``). Each token's input is

    gene embedding (vocabulary id) + value embedding (its expression) + perturbation embedding

and a transformer encoder followed by a per-token MLP predicts the gene's perturbed expression.
Module names follow scGPT's (``encoder.embedding``, ``encoder.enc_norm``, ``value_encoder.*``,
``transformer_encoder.layers.*``, ``pert_encoder``, ``decoder.fc.*``), so weights of a pretrained
scGPT model load by name (see :func:`rename_pretrained_keys`).

Values are read in one of two ways (``input_emb_style``): ``continuous`` (a small MLP of the value)
or ``category`` (per-cell quantile bins, :func:`bin_values`, then an embedding table). The
perturbation part is swappable: ``genetic`` marks the perturbed genes' tokens with a flag
embedding; ``chemical`` adds a projection of the perturbation vector to every token.
"""

from __future__ import annotations

import torch
from torch import nn

from state.utils.errors import StateError

VALUE_STYLES = ("continuous", "category")
PERTURBATION_TYPES = ("genetic", "chemical")
MAX_CONTINUOUS_VALUE = 512.0
FLAG_UNPERTURBED, FLAG_PERTURBED = 0, 1


def bin_values(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-cell quantile binning [N, L] -> long [N, L]: zeros stay 0, positive values get 1..n_bins-1."""
    positive = values > 0
    quantiles = torch.linspace(0, 1, n_bins, device=values.device)[1:-1]  # n_bins - 2 inner edges
    masked = torch.where(positive, values.float(), torch.full_like(values.float(), float("nan")))
    edges = torch.nanquantile(masked, quantiles, dim=1).T.nan_to_num(0.0).contiguous()  # [N, n_bins - 2]
    bins = torch.searchsorted(edges, values.float().contiguous()) + 1  # [N, L]
    return torch.where(positive, bins, torch.zeros_like(bins))


class GeneEncoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int, *, padding_idx: int | None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))  # [N, L] -> [N, L, d]


class ContinuousValueEncoder(nn.Module):
    def __init__(self, dim: int, *, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, dim)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.clamp(max=MAX_CONTINUOUS_VALUE).unsqueeze(-1)  # [N, L, 1]
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))  # [N, L, d]


class CategoryValueEncoder(nn.Module):
    def __init__(self, n_bins: int, dim: int) -> None:
        super().__init__()
        self.n_bins = int(n_bins)
        self.embedding = nn.Embedding(self.n_bins, dim)
        self.enc_norm = nn.LayerNorm(dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(bin_values(values, self.n_bins)))  # [N, L, d]


class GeneticPerturbation(nn.Module):
    """A flag per token: perturbed gene / other gene / padding (``<cls>``)."""

    def __init__(self, dim: int, *, pert_pad_id: int) -> None:
        super().__init__()
        self.pert_pad_id = int(pert_pad_id)
        self.embedding = nn.Embedding(max(3, self.pert_pad_id + 1), dim, padding_idx=self.pert_pad_id)

    def forward(self, flags: torch.Tensor, pert: torch.Tensor) -> torch.Tensor:
        return self.embedding(flags)  # [N, L] -> [N, L, d]


class ChemicalPerturbation(nn.Module):
    """The perturbation vector (one-hot or features) projected and added to every token."""

    def __init__(self, dim: int, *, pert_dim: int) -> None:
        super().__init__()
        self.projection = nn.Linear(pert_dim, dim)

    def forward(self, flags: torch.Tensor, pert: torch.Tensor) -> torch.Tensor:
        return self.projection(pert).unsqueeze(1)  # [N, P] -> [N, 1, d]


class ExprDecoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(), nn.Linear(dim, dim), nn.LeakyReLU(),
                                nn.Linear(dim, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(hidden).squeeze(-1)  # [N, L, d] -> [N, L]


class ScGPTNet(nn.Module):
    """Gene tokens + values + perturbation -> predicted expression per token."""

    def __init__(self, *, vocab_size: int, pad_id: int | None, embsize: int, nhead: int, d_hid: int, nlayers: int,
                 dropout: float, input_emb_style: str, n_input_bins: int, perturbation_type: str, pert_dim: int,
                 pert_pad_id: int) -> None:
        super().__init__()
        if input_emb_style not in VALUE_STYLES:
            raise StateError(f"model.kwargs.input_emb_style={input_emb_style!r} is not one of {', '.join(VALUE_STYLES)}")
        if perturbation_type not in PERTURBATION_TYPES:
            raise StateError(f"model.kwargs.perturbation_type={perturbation_type!r} is not one of "
                             f"{', '.join(PERTURBATION_TYPES)}")
        if embsize % nhead:
            raise StateError(f"model.kwargs.embsize={embsize} is not divisible by model.kwargs.nhead={nhead}")
        self.encoder = GeneEncoder(vocab_size, embsize, padding_idx=pad_id)
        if input_emb_style == "continuous":
            self.value_encoder: nn.Module = ContinuousValueEncoder(embsize, dropout=dropout)
        else:
            self.value_encoder = CategoryValueEncoder(n_input_bins, embsize)
        if perturbation_type == "genetic":
            self.pert_encoder: nn.Module = GeneticPerturbation(embsize, pert_pad_id=pert_pad_id)
        else:
            self.pert_encoder = ChemicalPerturbation(embsize, pert_dim=pert_dim)
        layer = nn.TransformerEncoderLayer(embsize, nhead, d_hid, dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = ExprDecoder(embsize)

    def forward(self, ids: torch.Tensor, values: torch.Tensor, flags: torch.Tensor, pert: torch.Tensor) -> torch.Tensor:
        """ids / values / flags [N, L], pert [N, P] -> predicted values [N, L]."""
        x = self.encoder(ids) + self.value_encoder(values) + self.pert_encoder(flags, pert)  # [N, L, d]
        return self.decoder(self.transformer_encoder(x))  # [N, L]


def rename_pretrained_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """scGPT checkpoints trained with flash-attention name the fused projection ``Wqkv``; torch's
    encoder layer calls it ``in_proj``. Everything else already matches."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("self_attn.Wqkv.weight", "self_attn.in_proj_weight")
        key = key.replace("self_attn.Wqkv.bias", "self_attn.in_proj_bias")
        renamed[key] = value
    return renamed
