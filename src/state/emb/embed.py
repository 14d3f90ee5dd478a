"""The SE embedding engine: expression rows in, [cells, output_dim + 10] float32 out.

Rows are processed in blocks of ``SAMPLING_BLOCK`` cells (one RNG stream each), tokenized on the
CPU and run through the model in batches of ``batch_size`` sentences. Memory use depends on the
block and batch sizes only, never on the number of cells.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from state.emb.checkpoint import LoadedSE, load_se_model
from state.emb.tokenize import SAMPLING_BLOCK, GeneMapping, SentenceBuilder, block_rng, map_genes

log = logging.getLogger(__name__)


class SEEmbedder:
    """Embeds row blocks with a loaded SE model (bf16 autocast on CUDA, float32 elsewhere)."""

    def __init__(self, loaded: LoadedSE, mapping: GeneMapping, *, batch_size: int | None = None,
                 seed: int | None = None) -> None:
        self.loaded = loaded
        self.batch_size = int(batch_size or loaded.default_batch_size)
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.seed = seed
        self.builder = SentenceBuilder(mapping, pad_length=loaded.pad_length, cls_token_idx=loaded.cls_token_idx)

    @property
    def width(self) -> int:
        return self.loaded.arch.embedding_width

    def _autocast(self):
        device = self.loaded.device
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def embed_sentences(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        device = self.loaded.device
        out = np.empty((ids.shape[0], self.width), dtype=np.float32)
        for start in range(0, ids.shape[0], self.batch_size):
            stop = start + self.batch_size
            id_batch = torch.from_numpy(ids[start:stop]).to(device)
            count_batch = torch.from_numpy(counts[start:stop]).to(device)
            if device.type == "cuda":
                count_batch = count_batch.to(torch.bfloat16)  # arc-state casts inference batches to bf16 on GPU
            with self._autocast():
                out[start:stop] = self.loaded.model(id_batch, count_batch).float().cpu().numpy()
        return out

    def embed_block(self, block_index: int, rows: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Embed one block of at most ``SAMPLING_BLOCK`` rows whose first row is ``block_index * SAMPLING_BLOCK``."""
        ids, counts = self.builder.build(sp.csr_matrix(rows), block_rng(self.seed, block_index))
        return self.embed_sentences(ids, counts)

    def embed_chunks(self, chunks: Iterable[tuple[int, sp.spmatrix | np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) chunks -> (first row, embeddings); chunks must start at block boundaries."""
        for first, rows in chunks:
            if first % SAMPLING_BLOCK:
                raise ValueError(f"chunk start {first} is not a multiple of {SAMPLING_BLOCK}")
            n = rows.shape[0]
            parts = [
                self.embed_block((first + off) // SAMPLING_BLOCK, rows[off : off + SAMPLING_BLOCK])
                for off in range(0, n, SAMPLING_BLOCK)
            ]
            yield first, np.concatenate(parts) if parts else np.empty((0, self.width), np.float32)
        if self.builder.nan_cells:
            log.warning("%d cells had NaN expression values; they were treated as 0", self.builder.nan_cells)


def _row_chunks(matrix, n_rows: int, chunk: int) -> Iterator[tuple[int, sp.spmatrix | np.ndarray]]:
    csc = sp.issparse(matrix) and matrix.format == "csc"
    if csc:  # row slices of CSC are slow; in-memory data can be converted once
        matrix = matrix.tocsr()
    for start in range(0, n_rows, chunk):
        rows = matrix[start : start + chunk]
        yield start, rows if sp.issparse(rows) else np.asarray(rows)


def embed_adata(
    adata,
    loaded: LoadedSE,
    *,
    batch_size: int | None = None,
    seed: int | None = None,
    gene_column: str | None = None,
) -> np.ndarray:
    """Embed every cell of an in-memory (or backed) AnnData with a loaded SE model.

    Returns float32 [n_obs, output_dim + 10]: L2-normalised cell part, then the dataset part.
    """
    mapping = map_genes(adata.var, loaded.gene_to_index, gene_column=gene_column, where="AnnData")
    embedder = SEEmbedder(loaded, mapping, batch_size=batch_size, seed=seed)
    out = np.empty((adata.n_obs, embedder.width), dtype=np.float32)
    for first, emb in embedder.embed_chunks(_row_chunks(adata.X, adata.n_obs, 4 * SAMPLING_BLOCK)):
        out[first : first + emb.shape[0]] = emb
    return out


def embed_anndata(
    adata,
    *,
    model_folder: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    protein_embeddings: str | os.PathLike | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    gene_column: str | None = None,
    embed_key: str | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Embed an in-memory AnnData with an SE checkpoint (the Python face of ``state emb transform``).

    Model resolution is the CLI's: ``checkpoint`` wins over ``model_folder``; protein embeddings
    come from ``protein_embeddings``, the folder, the checkpoint or its config. With ``embed_key``
    the result is also stored in ``adata.obsm[embed_key]``. Returns float32 [n_obs, output_dim + 10].
    """
    loaded = load_se_model(model_folder=model_folder, checkpoint=checkpoint, config=config,
                           protein_embeddings=protein_embeddings, device=device)
    emb = embed_adata(adata, loaded, batch_size=batch_size, seed=seed, gene_column=gene_column)
    if embed_key is not None:
        adata.obsm[embed_key] = emb
    return emb
