"""The SE embedding engine: expression rows in, [cells, output_dim + 10] float32 out.

Rows are processed in blocks of ``SAMPLING_BLOCK`` cells (one RNG stream each), tokenized on the
CPU and run through the model in batches of ``batch_size`` sentences. Memory use depends on the
block and batch sizes only, never on the number of cells.

Reading and tokenizing run in a background thread, ``PREFETCH_CHUNKS`` chunks ahead of the model, so
the device does not wait for the CPU (numpy and torch release the GIL in their kernels; on CUDA the
sentences are pinned there and copied without blocking). Which thread tokenizes changes no number.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from state.emb.checkpoint import LoadedSE, load_se_model
from state.emb.tokenize import SAMPLING_BLOCK, GeneMapping, SentenceBuilder, block_rng, map_genes

log = logging.getLogger(__name__)

PREFETCH_CHUNKS = 2
_DONE = object()


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

    def tokenize(self, block_index: int, rows: sp.spmatrix | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Sentences of one block as CPU tensors (pinned when the model is on CUDA)."""
        ids, counts = self.builder.build(sp.csr_matrix(rows), block_rng(self.seed, block_index))
        ids_t, counts_t = torch.from_numpy(ids), torch.from_numpy(counts)
        if self.loaded.device.type == "cuda":
            ids_t, counts_t = ids_t.pin_memory(), counts_t.pin_memory()
        return ids_t, counts_t

    @torch.inference_mode()
    def embed_sentences(self, ids: np.ndarray | torch.Tensor, counts: np.ndarray | torch.Tensor) -> np.ndarray:
        device = self.loaded.device
        ids, counts = torch.as_tensor(ids), torch.as_tensor(counts)
        if ids.shape[0] == 0:
            return np.empty((0, self.width), dtype=np.float32)
        parts = []
        for start in range(0, ids.shape[0], self.batch_size):
            stop = start + self.batch_size
            id_batch = ids[start:stop].to(device, non_blocking=True)
            count_batch = counts[start:stop].to(device, non_blocking=True)
            if device.type == "cuda":
                count_batch = count_batch.to(torch.bfloat16)  # arc-state casts inference batches to bf16 on GPU
            with self._autocast():
                parts.append(self.loaded.model(id_batch, count_batch).float())
        # one device -> host copy per block, not one synchronising .cpu() per batch
        return torch.cat(parts).cpu().numpy()

    def embed_block(self, block_index: int, rows: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Embed one block of at most ``SAMPLING_BLOCK`` rows whose first row is ``block_index * SAMPLING_BLOCK``."""
        return self.embed_sentences(*self.tokenize(block_index, rows))

    def _tokenized_chunks(self, chunks: Iterable[tuple[int, sp.spmatrix | np.ndarray]]) -> Iterator[tuple]:
        for first, rows in chunks:
            if first % SAMPLING_BLOCK:
                raise ValueError(f"chunk start {first} is not a multiple of {SAMPLING_BLOCK}")
            yield first, [
                self.tokenize((first + off) // SAMPLING_BLOCK, rows[off : off + SAMPLING_BLOCK])
                for off in range(0, rows.shape[0], SAMPLING_BLOCK)
            ]

    def embed_chunks(self, chunks: Iterable[tuple[int, sp.spmatrix | np.ndarray]], *,
                     prefetch: int = PREFETCH_CHUNKS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) chunks -> (first row, embeddings); chunks must start at block boundaries.

        The chunks are read (the iterator is advanced) and tokenized in a background thread.
        """
        for first, blocks in prefetched(self._tokenized_chunks(chunks), prefetch):
            parts = [self.embed_sentences(ids, counts) for ids, counts in blocks]
            yield first, np.concatenate(parts) if parts else np.empty((0, self.width), np.float32)
        if self.builder.nan_cells:
            log.warning("%d cells had NaN expression values; they were treated as 0", self.builder.nan_cells)


def prefetched(items: Iterable, depth: int) -> Iterator:
    """Iterate ``items`` in a daemon thread, at most ``depth`` items ahead; its errors re-raise here."""
    if depth < 1:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put((_DONE, exc))

    thread = threading.Thread(target=produce, name="se-tokenize", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                slots.get_nowait()
        thread.join(timeout=5)


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
