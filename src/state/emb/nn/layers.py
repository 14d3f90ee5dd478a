"""Building blocks of the State Embedding (SE) network.

Parameter names follow arc-state's state-dict layout so checkpoints load both ways.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_COUNT_BINS = 10
COUNT_HIDDEN = 512


class SkipBlock(nn.Module):
    """``LayerNorm(x + dense(ReLU(intermediate_dense(x))))`` with a 2x wide hidden layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(width, 2 * width)
        self.dense = nn.Linear(2 * width, width)
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.dense(F.relu(self.intermediate_dense(x))))


class PostNormSelfAttentionLayer(nn.Module):
    """One post-LayerNorm transformer layer with a packed ``qkv_proj`` (Q, K, V along dim 0).

    No mask, not causal, no positions: the output for a token depends only on the set of tokens.
    ``dropout`` is passed to SDPA even in eval mode (as arc-state does), so inference uses 0.
    """

    def __init__(self, d_model: int, nhead: int, d_hid: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.nhead = nhead
        self.dropout = dropout
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.drop_attn = nn.Dropout(dropout)
        self.drop_ffn_inner = nn.Dropout(dropout)
        self.drop_ffn_out = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape  # [B, L, d]
        qkv = self.qkv_proj(h).view(batch, length, 3, self.nhead, width // self.nhead)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, L, head_dim]
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout)
        attn = attn.transpose(1, 2).reshape(batch, length, width)
        h = self.norm1(h + self.drop_attn(self.out_proj(attn)))
        ffn = self.linear2(self.drop_ffn_inner(F.gelu(self.linear1(h))))
        return self.norm2(h + self.drop_ffn_out(ffn))


class SETransformerEncoder(nn.Module):
    """A stack of :class:`PostNormSelfAttentionLayer` (keys ``layers.{i}.*``)."""

    def __init__(self, d_model: int, nhead: int, d_hid: int, nlayers: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            PostNormSelfAttentionLayer(d_model, nhead, d_hid, dropout) for _ in range(nlayers)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h


def token_encoder(token_dim: int, d_model: int) -> nn.Sequential:
    """Raw gene vector -> model width: Linear, LayerNorm, SiLU (keys ``0.*``, ``1.*``)."""
    return nn.Sequential(nn.Linear(token_dim, d_model), nn.LayerNorm(d_model), nn.SiLU())


def count_bin_encoder() -> nn.Sequential:
    """Scalar count -> logits over the expression bins (keys ``0.*``, ``2.*``)."""
    return nn.Sequential(nn.Linear(1, COUNT_HIDDEN), nn.LeakyReLU(), nn.Linear(COUNT_HIDDEN, NUM_COUNT_BINS))


def soft_binned_count_embedding(
    counts: torch.Tensor, count_encoder: nn.Module, bin_embeddings: torch.Tensor
) -> torch.Tensor:
    """scFoundation-style soft binning: ``softmax(count_encoder(c)) @ bin_embeddings``.

    counts [B, L] -> [B, L, d]; bin_embeddings [bins, d].
    """
    bin_probs = torch.softmax(count_encoder(counts.unsqueeze(-1)), dim=-1)  # [B, L, bins]
    return bin_probs @ bin_embeddings.to(bin_probs.dtype)


def dataset_classifier(output_dim: int, d_model: int, num_datasets: int) -> nn.Sequential:
    """Training-only head predicting the source dataset from the dataset-token output."""
    return nn.Sequential(
        nn.Linear(output_dim, d_model),
        nn.SiLU(),
        nn.LayerNorm(d_model),
        nn.Dropout(0.1),
        nn.Linear(d_model, num_datasets),
    )


def scale_by_width(h: torch.Tensor, d_model: int) -> torch.Tensor:
    return h * math.sqrt(d_model)
