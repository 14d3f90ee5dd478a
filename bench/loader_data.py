"""Replogle/Tahoe-shaped training files for the loader benchmark, written without holding them in memory.

Shape: ``n_cells`` cells, 2,000-wide float32 ``obsm['X_hvg']`` (contiguous, uncompressed, as anndata
writes dense arrays), 4 cell types, 8 batches (``gem_group``), ~10% controls (``non-targeting``) and
2,000 perturbations whose cell counts are drawn uniformly from 50-500 and scaled so they fill the rest.
Rows are in random order (``order="random"``) or sorted by (cell type, perturbation) for cell-load's
``use_consecutive_loading`` (``order="grouped"``). X is an empty CSR matrix (the X_hvg benchmarks read
X_hvg only), or with ``n_genes`` a full-gene counts-like CSR matrix, ~2,000 values per cell (see
:func:`_write_counts`).

Values are uniform random floats by default. With ``compress`` (``"lzf"`` or ``"gzip"``) X_hvg is
written in chunks of 256 rows with that filter and with values shaped like log-normalised HVG
expression (about 60% zeros, a few distinct levels), which compress: a 4M-cell file then takes about
a seventh of its 32 GB on disk with gzip, so the file and its 32 GB layout fit a disk that cannot hold two raw
copies. The layout rewrite reads it like any other h5ad; the layout itself is always raw float32.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

WIDTH = 2000
CELL_TYPES = ("K562", "RPE1", "HepG2", "Jurkat")
N_BATCHES = 8
N_PERTS = 2000
CONTROL = "non-targeting"


def labels(n_cells: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Codes per cell: perturbation (0 = control), cell type, batch; random row order."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(50, 501, N_PERTS).astype(float)
    n_control = n_cells // 10
    sizes = np.floor(sizes / sizes.sum() * (n_cells - n_control)).astype(np.int64)
    sizes[: (n_cells - n_control) - sizes.sum()] += 1
    pert = np.concatenate([np.zeros(n_control, np.int32), np.repeat(np.arange(1, N_PERTS + 1, dtype=np.int32), sizes)])
    perm = rng.permutation(n_cells)
    return {"gene": pert[perm], "cell_type": rng.integers(0, len(CELL_TYPES), n_cells).astype(np.int32),
            "gem_group": rng.integers(0, N_BATCHES, n_cells).astype(np.int32)}


def _skeleton(path: Path, codes: dict[str, np.ndarray], n_genes: int = WIDTH) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    n = len(codes["gene"])
    perts = [CONTROL] + [f"PERT{i:04d}" for i in range(1, N_PERTS + 1)]
    obs = pd.DataFrame({
        "gene": pd.Categorical.from_codes(codes["gene"], perts),
        "cell_type": pd.Categorical.from_codes(codes["cell_type"], list(CELL_TYPES)),
        "gem_group": pd.Categorical.from_codes(codes["gem_group"], [f"b{i}" for i in range(N_BATCHES)]),
    }, index=pd.Index([f"c{i:08d}" for i in range(n)]))
    var = pd.DataFrame({"highly_variable": np.arange(n_genes) < WIDTH}, index=[f"G{i:05d}" for i in range(n_genes)])
    x = sp.csr_matrix((np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(n + 1, np.int64)), shape=(n, n_genes))
    ad.AnnData(X=x, obs=obs, var=var, uns={"log1p": {"base": None}}).write_h5ad(path)


LEVELS = np.log1p(np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 5], np.float32) / 2).astype(np.float32)


def _values(rng: np.random.Generator, rows: int, compressible: bool) -> np.ndarray:
    if not compressible:
        return rng.random((rows, WIDTH), dtype=np.float32)
    return LEVELS[rng.integers(0, len(LEVELS), (rows, WIDTH), dtype=np.uint8)]


def _write_counts(fh: h5py.File, n: int, n_genes: int, nnz: int, rng: np.random.Generator, block: int) -> None:
    """X as CSR, ~``nnz`` values per cell: genes at random gaps (mean n_genes / nnz), values log1p of
    counts-like integers (geometric, mostly 1-3), written block by block."""
    del fh["X"]
    group = fh.create_group("X")
    group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n, n_genes)})
    data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(2**20,))
    indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(2**20,))
    indptr = np.zeros(n + 1, np.int64)
    gap = max(1, 2 * n_genes // nnz)
    for first in range(0, n, block):
        rows = min(block, n - first)
        genes = np.cumsum(rng.integers(1, gap, (rows, nnz), dtype=np.int32), axis=1, dtype=np.int32) - 1
        keep = genes < n_genes
        cols = genes[keep]
        values = np.log1p(rng.geometric(0.5, len(cols)).astype(np.float32))
        indptr[first + 1:first + rows + 1] = indptr[first] + np.cumsum(keep.sum(1))
        at = data.shape[0]
        for ds, part in ((data, values), (indices, cols)):
            ds.resize((at + len(part),))
            ds[at:] = part
    group.create_dataset("indptr", data=indptr)


def write_file(path: Path, codes: dict[str, np.ndarray], *, seed: int, block: int = 16384,
               compress: str | None = None, n_genes: int | None = None, nnz: int = 2000) -> Path:
    """One h5ad with these cells; X_hvg rows are random values written block by block; with ``n_genes``,
    X is a counts-like CSR matrix of that many genes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _skeleton(tmp, codes, n_genes or WIDTH)
    n = len(codes["gene"])
    rng = np.random.default_rng(seed)
    with h5py.File(tmp, "a") as fh:
        filters = {"chunks": (256, WIDTH), "compression": compress} if compress else {}
        if compress == "gzip":
            filters["compression_opts"] = 1  # fast; these values compress ~7x even at level 1
        ds = fh["obsm"].create_dataset("X_hvg", shape=(n, WIDTH), dtype=np.float32, **filters)
        ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
        for first in range(0, n, block):
            ds[first:first + block] = _values(rng, min(block, n - first), compress is not None)
        if n_genes:
            _write_counts(fh, n, n_genes, nnz, rng, block=4096)
    tmp.replace(path)
    return path


def write_dataset(folder: Path, n_cells: int, *, n_files: int = 1, order: str = "random", seed: int = 0,
                  compress: str | None = None, n_genes: int | None = None) -> Path:
    """``folder`` with ``n_files`` h5ad files holding ``n_cells`` cells together (written once)."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    codes = labels(n_cells, seed)
    if order == "grouped":
        sort = np.lexsort((codes["gem_group"], codes["gene"], codes["cell_type"]))
        codes = {k: v[sort] for k, v in codes.items()}
    bounds = np.linspace(0, n_cells, n_files + 1).astype(np.int64)
    for i in range(n_files):
        part = {k: v[bounds[i]:bounds[i + 1]] for k, v in codes.items()}
        write_file(folder / f"part{i}.h5ad", part, seed=seed + 1 + i, compress=compress, n_genes=n_genes)
    done.write_text("ok\n")
    return folder


def write_toml(path: Path, folder: Path, name: str = "bench") -> Path:
    """Every cell type trains; one perturbation per cell type of the first file is held out for val."""
    path.write_text(f'[datasets]\n{name} = "{folder}"\n\n[training]\n{name} = "train"\n\n'
                    f'[fewshot."{name}.K562"]\nval = ["PERT0001"]\ntest = ["PERT0002"]\n')
    return path
