"""``state emb transform``: embed the cells of an h5ad with an SE checkpoint.

Unlike arc-state (which loads the whole file), the input is streamed: CSR row blocks or dense row
slices are read straight from the HDF5 file, embedded, and written into the output as they come
(a copy of the input with ``obsm[embed_key]`` filled block by block, or a memory-mapped ``.npy``).
Outputs appear atomically: on any error nothing is left at the output path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from state.io.h5ad import open_h5ad, read_obs, read_var
from state.utils.errors import StateError

log = logging.getLogger(__name__)

MAX_IN_MEMORY_CSC_NNZ = 50_000_000  # CSC inputs up to this size are converted in memory (arc-state does)
DEFAULT_CHUNK_ROWS = 8192


# ---------------------------------------------------------------------------------------------- input
class RowReader:
    """Reads row blocks of ``X`` from an open h5ad without loading the whole matrix."""

    def __init__(self, handle, *, n_obs: int, n_vars: int, max_csc_nnz: int = MAX_IN_MEMORY_CSC_NNZ) -> None:
        import h5py

        self.path = handle.filename
        if "X" not in handle:
            raise StateError(f"{self.path} has no X matrix", hint="store the expression matrix in X")
        x = handle["X"]
        enc = x.attrs.get("encoding-type")
        enc = enc.decode() if isinstance(enc, bytes) else enc
        if isinstance(x, h5py.Dataset) and (enc in (None, "array")) and x.ndim == 2:
            self.kind = "dense"
        elif isinstance(x, h5py.Group) and all(k in x for k in ("indptr", "indices", "data")) and enc in (
            None, "csr_matrix", "csc_matrix"
        ):
            self.kind = "csc" if enc == "csc_matrix" else "csr"
        else:
            raise StateError(
                f"{self.path}: X has encoding '{enc}', expected csr_matrix, csc_matrix or a dense array",
                hint="store X as a CSR matrix",
            )
        self.x, self.n_obs, self.n_vars = x, n_obs, n_vars
        if self.kind == "csc":
            nnz = x["data"].shape[0]
            if nnz > max_csc_nnz:
                raise StateError(
                    f"{self.path}: X is CSC with {nnz} stored values; rows cannot be streamed from CSC",
                    hint="convert X to CSR once, e.g. `a = anndata.read_h5ad(f); a.X = a.X.tocsr(); a.write_h5ad(f)`",
                )
            log.info("X is CSC (%d values): converting to CSR in memory", nnz)
            self._csr = sp.csc_matrix(
                (x["data"][:], x["indices"][:], x["indptr"][:]), shape=(n_obs, n_vars)
            ).tocsr()
        elif self.kind == "csr":
            self.indptr = x["indptr"][:].astype(np.int64)
            if self.indptr.shape[0] != n_obs + 1:
                raise StateError(f"{self.path}: X/indptr has {self.indptr.shape[0]} entries for {n_obs} cells",
                                 hint="re-write the file with anndata")
        elif tuple(x.shape) != (n_obs, n_vars):
            raise StateError(f"{self.path}: X has shape {tuple(x.shape)}, obs x var is {(n_obs, n_vars)}",
                             hint="re-write the file with anndata")
        if self.kind == "dense":
            log.info("X is dense: reading it in row blocks")

    def read(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        if self.kind == "csc":
            return self._csr[start:stop]
        if self.kind == "dense":
            return np.asarray(self.x[start:stop])
        lo, hi = self.indptr[start], self.indptr[stop]
        return sp.csr_matrix(
            (self.x["data"][lo:hi], self.x["indices"][lo:hi], self.indptr[start : stop + 1] - lo),
            shape=(stop - start, self.n_vars),
        )

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, sp.csr_matrix | np.ndarray]]:
        for start in range(0, self.n_obs, chunk_rows):
            yield start, self.read(start, min(start + chunk_rows, self.n_obs))


# ---------------------------------------------------------------------------------------------- output
def _prepare_h5ad_copy(source: Path, tmp: Path, embed_key: str, shape: tuple[int, int]):
    """Copy the input next to the output and add an empty obsm[embed_key]; returns (file, dataset)."""
    import h5py

    shutil.copyfile(source, tmp)
    out = h5py.File(tmp, "r+")
    if "obsm" not in out:
        group = out.create_group("obsm")
        group.attrs["encoding-type"] = "dict"
        group.attrs["encoding-version"] = "0.1.0"
    if embed_key in out["obsm"]:
        del out["obsm"][embed_key]  # arc-state overwrites an existing key
    dataset = out["obsm"].create_dataset(embed_key, shape=shape, dtype=np.float32,
                                         chunks=(min(shape[0], 4096) or 1, shape[1]))
    dataset.attrs["encoding-type"] = "array"
    dataset.attrs["encoding-version"] = "0.2.0"
    return out, dataset


@dataclass
class TransformResult:
    n_cells: int
    width: int
    outputs: list[str] = field(default_factory=list)
    computed_units: int = 0  # sharded runs: work units computed by this call (done ones are skipped)


def transform(
    input: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    lancedb: str | os.PathLike | None = None,
    model_folder: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    embed_key: str = "X_state",
    protein_embeddings: str | os.PathLike | None = None,
    batch_size: int | None = None,
    gene_column: str | None = None,
    seed: int | None = None,
    lancedb_batch_size: int = 1000,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: str | None = None,
    max_csc_nnz: int = MAX_IN_MEMORY_CSC_NNZ,
    prefetch: int | None = None,
) -> TransformResult:
    """Embed every cell of ``input``; write ``output`` (.npy or .h5ad) and/or append to ``lancedb``.

    ``prefetch``: chunks read and tokenized ahead in a background thread (0: in line, as before; for benchmarks).
    """
    from state.emb.checkpoint import load_se_model
    from state.emb.embed import PREFETCH_CHUNKS, SEEmbedder
    from state.emb.tokenize import SAMPLING_BLOCK, map_genes
    from state.emb.vectordb import check_table_compatible, record_schema, write_embeddings
    from state.utils.progress import progress

    _check_targets(output, lancedb, batch_size)
    input_path = Path(input)
    chunk_rows = max(SAMPLING_BLOCK, chunk_rows // SAMPLING_BLOCK * SAMPLING_BLOCK)

    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(open_h5ad(input_path))
        var, obs = read_var(handle), read_obs(handle)
        if len(obs) == 0:
            raise StateError(f"{input_path} has no cells", hint="pass a non-empty h5ad")
        reader = RowReader(handle, n_obs=len(obs), n_vars=len(var), max_csc_nnz=max_csc_nnz)
        loaded = load_se_model(model_folder=model_folder, checkpoint=checkpoint, config=config,
                               protein_embeddings=protein_embeddings, device=device)
        mapping = map_genes(var, loaded.gene_to_index, gene_column=gene_column, where=str(input_path))
        embedder = SEEmbedder(loaded, mapping, batch_size=batch_size, seed=seed)
        shape = (len(obs), embedder.width)
        if lancedb is not None:
            check_table_compatible(Path(lancedb), record_schema(embedder.width, obs))
        target = _open_target(stack, input_path, output, lancedb, embed_key, shape, csc_input=reader.kind == "csc")

        bar = stack.enter_context(progress(total=shape[0], desc="embedding", unit="cell"))
        for first, emb in embedder.embed_chunks(reader.chunks(chunk_rows),
                                                        prefetch=PREFETCH_CHUNKS if prefetch is None else prefetch):
            target.store[first : first + emb.shape[0]] = emb
            bar.update(emb.shape[0])

        if lancedb is not None:
            write_embeddings(lancedb, target.store, obs, embed_key=embed_key, dataset=input_path.stem or "unknown",
                             batch_size=lancedb_batch_size)
        target.finish(input_path, embed_key)
    outputs = [str(p) for p in (output, lancedb) if p is not None]
    log.info("embedded %d cells (width %d) -> %s", shape[0], shape[1], ", ".join(outputs))
    return TransformResult(n_cells=shape[0], width=shape[1], outputs=outputs)


def _check_targets(output, lancedb, batch_size: int | None) -> None:
    """Refuse before any work: nothing to write, a bad batch size, an unwritable output or database path."""
    from state.emb.vectordb import check_database_path
    from state.io.atomic import ensure_parent_writable

    if output is None and lancedb is None:
        raise StateError("nothing to write", hint="pass --output FILE (.h5ad or .npy) and/or --lancedb DIR")
    if batch_size is not None and batch_size < 1:
        raise StateError(f"--batch-size must be at least 1, got {batch_size}", hint="pass a positive batch size")
    if output is not None:
        ensure_parent_writable(output)
    if lancedb is not None:
        check_database_path(lancedb, must_exist=False)


@dataclass
class _Target:
    """Where the embeddings go while they are computed: ``store`` is an [n_cells, width] array view."""

    tmp: Path  # the temp file that becomes the output (or a scratch .npy for a LanceDB-only run)
    store: Any
    h5_out: Any = None  # open h5py handle when embedding straight into an h5ad copy
    rewrite_with_anndata: bool = False  # CSC input: rewrite the h5ad with anndata at the end

    def finish(self, input_path: Path, embed_key: str) -> None:
        if isinstance(self.store, np.memmap):
            self.store.flush()
        if self.rewrite_with_anndata:
            import anndata

            adata = anndata.read_h5ad(input_path)
            adata.X = sp.csr_matrix(adata.X)
            adata.obsm[embed_key] = np.asarray(self.store)
            adata.write_h5ad(self.tmp)
        if self.h5_out is not None:
            self.h5_out.close()
        self.store = None


def _open_target(stack: contextlib.ExitStack, input_path: Path, output, lancedb, embed_key: str,
                 shape: tuple[int, int], *, csc_input: bool) -> _Target:
    """A .npy memmap (npy output, LanceDB only, or CSC input) or the obsm dataset of an h5ad copy."""
    from state.io.atomic import atomic_path

    to_npy = output is not None and str(output).lower().endswith(".npy")
    rewrite_with_anndata = output is not None and not to_npy and csc_input
    if output is not None:
        tmp = stack.enter_context(atomic_path(output))
    else:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=Path(lancedb).parent))) / "emb.npy"
    if to_npy or output is None or rewrite_with_anndata:
        store_path = tmp if to_npy or output is None else tmp.with_name(tmp.name + ".emb.npy")
        store = np.lib.format.open_memmap(store_path, mode="w+", dtype=np.float32, shape=shape)
        if store_path != tmp:
            stack.callback(lambda p=store_path: Path(p).unlink(missing_ok=True))
        return _Target(tmp, store, rewrite_with_anndata=rewrite_with_anndata)
    h5_out, store = _prepare_h5ad_copy(input_path, tmp, embed_key, shape)
    stack.callback(h5_out.close)
    return _Target(tmp, store, h5_out=h5_out)
