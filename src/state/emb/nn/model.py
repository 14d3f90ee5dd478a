"""The State Embedding (SE) network as a plain ``nn.Module`` (no Lightning).

Forward pass and parameter layout follow arc-state's SE network exactly, so arc-state checkpoints load
into :class:`StateEmbeddingNet` and checkpoints saved from it load into arc-state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from state.emb.nn.layers import (
    NUM_COUNT_BINS,
    SETransformerEncoder,
    SkipBlock,
    count_bin_encoder,
    dataset_classifier,
    soft_binned_count_embedding,
    token_encoder,
)

DATASET_EMBED_DIM = 10


@dataclass(frozen=True)
class SEArchitecture:
    """Sizes and switches of an SE network (arc-state hyper-parameter names in the comments)."""

    token_dim: int  # T: width of the gene vectors (embeddings.<current>.size)
    d_model: int  # model.emsize
    nhead: int
    d_hid: int
    nlayers: int
    output_dim: int
    num_datasets: int = 1  # dataset.<current>.num_datasets
    counts: bool = True  # model.counts
    rda: bool = True  # model.rda: read depth is a decoder input
    dataset_correction: bool = True  # model.dataset_correction
    dropout: float = 0.0

    @property
    def z_dim(self) -> int:
        return int(self.rda) + (DATASET_EMBED_DIM if self.dataset_correction else 0)

    @property
    def decoder_input_dim(self) -> int:
        return self.output_dim + self.d_model + self.z_dim

    @property
    def embedding_width(self) -> int:
        """Width of what ``state emb transform`` writes: cell part + dataset part."""
        return self.output_dim + (DATASET_EMBED_DIM if self.dataset_correction else 0)

    def to_dict(self) -> dict:
        return asdict(self)


class StateEmbeddingNet(nn.Module):
    """SE transformer over "cell sentences" of gene tokens.

    Attribute order matters only for ``state_dict`` ordering; the names are arc-state's. ``encoder``
    and ``gene_embedding_layer`` are the same module object, so the state dict lists it twice.
    The frozen gene table ``pe_embedding`` is attached with :meth:`set_gene_table`.
    """

    def __init__(self, arch: SEArchitecture) -> None:
        super().__init__()
        self.arch = arch
        T, d, o = arch.token_dim, arch.d_model, arch.output_dim
        self.cls_token = nn.Parameter(torch.randn(1, T))
        if arch.dataset_correction:
            self.dataset_token = nn.Parameter(torch.randn(1, T))
        self.encoder = token_encoder(T, d)
        self.transformer_encoder = SETransformerEncoder(d, arch.nhead, arch.d_hid, arch.nlayers, arch.dropout)
        self.decoder = nn.Sequential(SkipBlock(d), nn.Linear(d, o))
        width = arch.decoder_input_dim
        self.binary_decoder = nn.Sequential(SkipBlock(width), SkipBlock(width), nn.Linear(width, 1))
        if arch.counts:
            self.bin_encoder = nn.Embedding(NUM_COUNT_BINS, d)
            self.count_encoder = count_bin_encoder()
        self.gene_embedding_layer = self.encoder
        if arch.dataset_correction:
            self.dataset_embedder = nn.Linear(o, DATASET_EMBED_DIM)
            self.dataset_encoder = dataset_classifier(o, d, arch.num_datasets)
        self.pe_embedding: nn.Embedding | None = None

    # ------------------------------------------------------------------ gene table
    def set_gene_table(self, table: torch.Tensor) -> None:
        """Attach the frozen vocabulary table [V, T]; row i is the vector of vocabulary gene i."""
        if table.ndim != 2 or table.shape[1] != self.arch.token_dim:
            raise ValueError(
                f"gene table has shape {tuple(table.shape)}, the model expects [V, {self.arch.token_dim}]"
            )
        device = self.cls_token.device
        self.pe_embedding = nn.Embedding.from_pretrained(table.to(device), freeze=True)

    def _lookup(self, gene_ids: torch.Tensor) -> torch.Tensor:
        if self.pe_embedding is None:
            raise RuntimeError("no gene table attached: call set_gene_table() first")
        return self.pe_embedding(gene_ids.long())

    # ------------------------------------------------------------------ embedding path
    def encode_sentences(self, gene_ids: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Run the transformer on cell sentences.

        gene_ids [B, L] global vocabulary indices (slot 0 is replaced by the CLS token);
        counts [B, L] per-slot count values (required when the model uses counts).
        Returns the decoder output per position, [B, L(+1 dataset token), output_dim].
        """
        batch = gene_ids.shape[0]
        tokens = F.normalize(self._lookup(gene_ids), dim=-1)  # [B, L, T]
        cls = self.cls_token.to(tokens.dtype).expand(batch, 1, -1)
        parts = [cls, tokens[:, 1:]]
        if self.arch.dataset_correction:
            parts.append(self.dataset_token.to(tokens.dtype).expand(batch, 1, -1))
        tokens = torch.cat(parts, dim=1)  # [B, L(+1), T]
        h = self.encoder(tokens) * math.sqrt(self.arch.d_model)
        if self.arch.counts:
            if counts is None:
                raise ValueError("this SE model uses counts: pass a counts tensor [B, L]")
            count_emb = soft_binned_count_embedding(counts, self.count_encoder, self.bin_encoder.weight)
            if self.arch.dataset_correction:  # the dataset token gets no count embedding
                count_emb = F.pad(count_emb, (0, 0, 0, 1))
            h = h + count_emb.to(h.dtype)
        h = self.transformer_encoder(h)
        return self.decoder(h)

    def embed_cells(
        self, gene_ids: torch.Tensor, counts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cell embedding (L2-normalised CLS output, [B, o]) and dataset embedding ([B, 10] or None)."""
        out = self.encode_sentences(gene_ids, counts)
        cell = F.normalize(out[:, 0], dim=1)
        ds = self.dataset_embedder(out[:, -1]) if self.arch.dataset_correction else None
        return cell, ds

    def forward(self, gene_ids: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """What ``state emb transform`` stores: concat(cell embedding, dataset embedding), float32."""
        cell, ds = self.embed_cells(gene_ids, counts)
        parts = [cell] if ds is None else [cell, ds]
        return torch.cat(parts, dim=1).float()

    # ------------------------------------------------------------------ decoder path (training, eval)
    def gene_embeddings(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """Task-gene embeddings for the decoder: no normalisation, no sqrt(d) scaling. [..., d]."""
        return self.gene_embedding_layer(self._lookup(gene_ids))

    def dataset_logits(self, dataset_token_output: torch.Tensor) -> torch.Tensor:
        """Dataset classifier on the raw dataset-token output [B, o] -> [B, num_datasets]."""
        return self.dataset_encoder(dataset_token_output)

    def decoder_inputs(
        self,
        cell_emb: torch.Tensor,
        gene_emb: torch.Tensor,
        read_depth: torch.Tensor | None = None,
        ds_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """concat(gene [d], cell [o], read depth [1] if rda, dataset embedding [10]) -> [B, G, D].

        cell_emb [B, o]; gene_emb [B, G, d] (or [G, d], shared by all cells); read_depth [B] or [B, G].
        """
        if gene_emb.ndim == 2:
            gene_emb = gene_emb.unsqueeze(0).expand(cell_emb.shape[0], -1, -1)
        batch, genes, _ = gene_emb.shape
        parts = [gene_emb, cell_emb.unsqueeze(1).expand(batch, genes, -1)]
        if self.arch.rda:
            if read_depth is None:
                raise ValueError("this SE model uses read depth (rda): pass read_depth")
            rd = read_depth if read_depth.ndim == 2 else read_depth.unsqueeze(1).expand(batch, genes)
            parts.append(rd.unsqueeze(-1).to(gene_emb.dtype))
        if self.arch.dataset_correction:
            if ds_emb is None:
                raise ValueError("this SE model uses dataset correction: pass ds_emb")
            parts.append(ds_emb.unsqueeze(1).expand(batch, genes, -1))
        return torch.cat(parts, dim=-1)

    def decode_genes(
        self,
        cell_emb: torch.Tensor,
        gene_emb: torch.Tensor,
        read_depth: torch.Tensor | None = None,
        ds_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Binary-decoder score per (cell, gene): [B, G]."""
        return self.binary_decoder(self.decoder_inputs(cell_emb, gene_emb, read_depth, ds_emb)).squeeze(-1)


__all__ = ["DATASET_EMBED_DIM", "SEArchitecture", "StateEmbeddingNet"]
