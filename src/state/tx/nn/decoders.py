"""Latent -> gene-expression decoder (``gene_decoder.*`` in checkpoints).

Two layouts, both part of the checkpoint format:

* plain: ``decoder`` = per hidden width ``[Linear, LayerNorm, GELU, Dropout]``, then
  ``[Linear(last, gene_dim), ReLU]``; Linear/LayerNorm at 0/1, 4/5, ..., final Linear at
  ``4 * len(hidden_dims)``.
* residual: ``blocks.{i}`` = ``[Linear, LayerNorm, GELU, Dropout]`` and ``final_layer`` =
  ``[Linear, ReLU]``; every odd block adds the output of the block before it (a skip connection
  over pairs of blocks, used when widths repeat).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def _block(in_dim: int, out_dim: int, dropout: float) -> list[nn.Module]:
    return [nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(), nn.Dropout(dropout)]


class LatentToGeneDecoder(nn.Module):
    """Map model outputs [..., latent_dim] to non-negative expression [..., gene_dim]."""

    def __init__(
        self,
        *,
        latent_dim: int,
        gene_dim: int,
        hidden_dims: Sequence[int] = (512, 1024),
        dropout: float = 0.1,
        residual_decoder: bool = False,
    ) -> None:
        super().__init__()
        self.residual_decoder = bool(residual_decoder)
        widths = [int(latent_dim), *(int(h) for h in hidden_dims)]
        if self.residual_decoder:
            self.blocks = nn.ModuleList(
                nn.Sequential(*_block(widths[i], widths[i + 1], dropout)) for i in range(len(widths) - 1)
            )
            self.final_layer = nn.Sequential(nn.Linear(widths[-1], int(gene_dim)), nn.ReLU())
        else:
            layers: list[nn.Module] = []
            for i in range(len(widths) - 1):
                layers += _block(widths[i], widths[i + 1], dropout)
            layers += [nn.Linear(widths[-1], int(gene_dim)), nn.ReLU()]
            self.decoder = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if not self.residual_decoder:
            return self.decoder(latent)
        x = latent
        previous = None
        for i, block in enumerate(self.blocks):
            out = block(x)
            # Skip connection every second block (when the widths line up).
            if i % 2 == 1 and previous is not None and previous.shape == out.shape:
                out = out + previous
            previous = out
            x = out
        return self.final_layer(x)


def builds_gene_decoder(hparams: Mapping[str, Any]) -> bool:
    """Whether a tx model with these hyper-parameters is constructed with a gene decoder
    (a ``decoder_cfg``, ``gene_decoder_bool`` not false, and an expression output space)."""
    return (
        bool(hparams.get("decoder_cfg"))
        and bool(hparams.get("gene_decoder_bool", True))
        and hparams.get("output_space", "gene") in ("gene", "all")
    )


def build_gene_decoder(decoder_cfg: Mapping[str, Any]) -> LatentToGeneDecoder:
    """Build the decoder from a ``decoder_cfg`` dict as stored in ``hyper_parameters``."""
    return LatentToGeneDecoder(
        latent_dim=int(decoder_cfg["latent_dim"]),
        gene_dim=int(decoder_cfg["gene_dim"]),
        hidden_dims=[int(h) for h in decoder_cfg.get("hidden_dims") or [1024, 1024, 512]],
        dropout=float(decoder_cfg.get("dropout", 0.1) if decoder_cfg.get("dropout") is not None else 0.1),
        residual_decoder=bool(decoder_cfg.get("residual_decoder", False)),
    )


def decoder_cfg_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = "gene_decoder.", dropout: float = 0.1
) -> dict[str, Any] | None:
    """Recover a ``decoder_cfg`` from the decoder weights (None when there is no decoder).

    More reliable than guessing widths from the gene count: the checkpoint's own shapes say
    exactly what was trained.
    """
    plain = _linear_shapes(state_dict, prefix + "decoder.")
    if plain:
        shapes = [plain[i] for i in sorted(plain)]
        residual = False
    else:
        blocks = _linear_shapes(state_dict, prefix + "blocks.", suffix=".0.weight")
        final = state_dict.get(prefix + "final_layer.0.weight")
        if final is None:
            return None
        shapes = [blocks[i] for i in sorted(blocks)] + [tuple(final.shape)]
        residual = True
    return {
        "latent_dim": int(shapes[0][1]),
        "gene_dim": int(shapes[-1][0]),
        "hidden_dims": [int(s[0]) for s in shapes[:-1]],
        "dropout": float(dropout),
        "residual_decoder": residual,
    }


def _linear_shapes(
    state_dict: Mapping[str, torch.Tensor], prefix: str, suffix: str = ".weight"
) -> dict[int, tuple[int, ...]]:
    found: dict[int, tuple[int, ...]] = {}
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith(suffix)):
            continue
        index = key[len(prefix) : len(key) - len(suffix)]
        if index.isdigit() and value.ndim == 2:
            found[int(index)] = tuple(value.shape)
    return found
