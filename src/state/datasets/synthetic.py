"""A tiny, realistic-looking Perturb-seq data set generator.

Counts are negative binomial (a gamma-Poisson mixture) around a mean built from

* a gene baseline (log-normal relative abundances, a few genes dominate as in real data),
* a cell-type profile (each cell type over/under-expresses a subset of genes),
* a batch effect (a milder multiplicative shift per gem group),
* a perturbation effect: every perturbation is a CRISPRi-style knockdown of its own target gene
  (so perturbation names are gene symbols present in ``var_names``) and also up- or
  down-regulates a handful of downstream genes,
* a per-cell library size.

Everything is driven by one ``seed``; the same arguments always give the same AnnData.
Used by the test helpers (``tests/helpers/synthetic.py``), ``examples/make_example.py`` and
``bench/bench_preprocess.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

# Real gene symbols first so small data sets look familiar; larger ones continue with G00001 ...
_SYMBOLS = (
    "ACTB", "GAPDH", "MYC", "TP53", "KRAS", "EGFR", "CDK1", "CCND1", "STAT3", "JUN",
    "FOS", "MAPK1", "AKT1", "PTEN", "RB1", "BRCA1", "VIM", "CD44", "SOX2", "GATA1",
    "TAL1", "KLF1", "HBG1", "HBB", "RPL13", "RPS6", "EEF1A1", "TPT1", "NPM1", "HSPA8",
    "LDHA", "PKM", "ENO1", "ALDOA", "TUBB", "MKI67", "TOP2A", "PCNA", "MCM2", "E2F1",
    "CDKN1A", "MDM2", "BAX", "BCL2", "XBP1", "ATF4", "DDIT3", "HSPA5", "SQSTM1", "NFKBIA",
    "IRF1", "SPI1", "CEBPA", "RUNX1", "MYB", "LMO2", "ZFPM1", "NFE2", "ID2", "HES1",
    "NOTCH1", "CTNNB1", "SMAD4", "TGFB1", "VEGFA", "HIF1A", "POLR2A", "SF3B1", "SRSF2", "U2AF1",
)
CELLTYPE_NAMES = ("K562", "HepG2", "Jurkat", "RPE1", "HEK293T")
CONTROL_LABEL = "non-targeting"


def gene_symbols(n_genes: int) -> list[str]:
    """``n_genes`` unique gene-symbol-like names."""
    names = list(_SYMBOLS[:n_genes])
    names += [f"G{i:05d}" for i in range(len(names), n_genes)]
    return names


def celltype_names(n_celltypes: int) -> list[str]:
    if n_celltypes <= len(CELLTYPE_NAMES):
        return list(CELLTYPE_NAMES[:n_celltypes])
    return [f"celltype{i}" for i in range(n_celltypes)]


def _assign_groups(rng, n_cells, n_celltypes, n_perts, control_fraction):
    """Balanced (cell type, perturbation) labels: each cell type gets its share of controls and an even split
    of perturbed cells over the perturbations, then cells are shuffled so file order carries no signal."""
    ct_codes, pert_codes = [], []  # pert code 0 = control, 1..n_perts = perturbations
    for ct, ct_cells in enumerate(np.array_split(np.arange(n_cells), n_celltypes)):
        n_ct = len(ct_cells)
        n_ctrl = max(1, round(control_fraction * n_ct)) if n_perts else n_ct
        perturbed = np.arange(n_ct - n_ctrl) % max(n_perts, 1) + 1
        ct_codes.append(np.full(n_ct, ct))
        pert_codes.append(np.concatenate([np.zeros(n_ctrl, dtype=int), perturbed]))
    order = rng.permutation(n_cells)
    return np.concatenate(ct_codes)[order], np.concatenate(pert_codes)[order]


def _log_effects(rng, *, n_genes, n_perts, n_celltypes, n_batches, targets):
    """Log-scale multiplicative effects: per cell type, per batch and per perturbation (row 0 = control)."""
    celltype = np.zeros((n_celltypes, n_genes))
    for ct in range(n_celltypes):
        genes = rng.choice(n_genes, size=max(1, n_genes // 5), replace=False)
        celltype[ct, genes] = rng.normal(0.0, 1.0, size=len(genes))
    batch = rng.normal(0.0, 0.15, size=(n_batches, n_genes))
    pert = np.zeros((n_perts + 1, n_genes))
    for p, target in enumerate(targets, start=1):
        others = np.setdiff1d(np.arange(n_genes), [target])
        downstream = rng.choice(others, size=min(len(others), max(2, n_genes // 20)), replace=False)
        pert[p, downstream] = rng.choice([-1.0, 1.0], size=len(downstream)) * rng.uniform(0.7, 1.5, len(downstream))
        pert[p, target] = np.log(0.1)  # knockdown of its own target to ~10 %
    return celltype, batch, pert


def make_perturbation_adata(
    *,
    n_cells: int = 400,
    n_genes: int = 100,
    n_perts: int = 6,
    n_celltypes: int = 2,
    n_batches: int = 3,
    control: str = CONTROL_LABEL,
    pert_col: str = "gene",
    celltype_col: str = "cell_type",
    batch_col: str = "gem_group",
    seed: int = 0,
    sparse: bool = True,
    control_fraction: float = 0.3,
    counts_per_gene: float = 2.0,
    dispersion: float = 4.0,
    chunk_cells: int = 4096,
) -> ad.AnnData:
    """Raw Perturb-seq-like counts: float32 CSR (or dense) integers, categorical obs, gene-symbol var names.

    ``counts_per_gene`` sets the mean library size (``counts_per_gene * n_genes``) and so the sparsity;
    ``dispersion`` is the negative-binomial shape (smaller = noisier). Counts are drawn in chunks of
    ``chunk_cells`` cells so that large benchmark matrices never exist densely in memory.
    ``uns['synthetic']`` records the seed and the knocked-down genes (= the perturbation names).
    """
    if n_perts >= n_genes:
        raise ValueError(f"n_perts ({n_perts}) must be smaller than n_genes ({n_genes})")
    rng = np.random.default_rng(seed)
    genes = gene_symbols(n_genes)
    celltypes = celltype_names(n_celltypes)
    batches = [f"batch{i + 1}" for i in range(n_batches)]

    log_base = rng.normal(0.0, 1.0, size=n_genes)
    base = np.exp(log_base) / np.exp(log_base).sum()
    # Knockdowns are only visible on expressed genes: target the better-expressed half.
    expressed = np.argsort(-log_base)[: max(n_perts, n_genes // 2)]
    named = expressed[expressed < len(_SYMBOLS)]  # prefer real symbols so examples read naturally
    pool = named if named.size >= n_perts else expressed
    targets = np.sort(rng.choice(pool, size=n_perts, replace=False))
    pert_names = [genes[t] for t in targets]
    ct_fx, batch_fx, pert_fx = _log_effects(
        rng, n_genes=n_genes, n_perts=n_perts, n_celltypes=n_celltypes, n_batches=n_batches, targets=targets
    )

    ct_codes, pert_codes = _assign_groups(rng, n_cells, n_celltypes, n_perts, control_fraction)
    batch_codes = rng.integers(0, n_batches, size=n_cells)
    library = np.exp(rng.normal(np.log(counts_per_gene * n_genes), 0.3, size=n_cells))

    blocks = []
    for start in range(0, n_cells, chunk_cells):
        rows = slice(start, min(start + chunk_cells, n_cells))
        log_mu = ct_fx[ct_codes[rows]] + batch_fx[batch_codes[rows]] + pert_fx[pert_codes[rows]]
        mu = library[rows, None] * base[None, :] * np.exp(log_mu)
        counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)
        blocks.append(sp.csr_matrix(counts) if sparse else counts)
    X = sp.vstack(blocks, format="csr") if sparse else np.vstack(blocks)

    obs = pd.DataFrame(
        {
            pert_col: pd.Categorical.from_codes(pert_codes, [control, *pert_names]),
            celltype_col: pd.Categorical.from_codes(ct_codes, celltypes),
            batch_col: pd.Categorical.from_codes(batch_codes, batches),
        },
        index=pd.Index([f"cell{i:06d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame({"gene_name": genes}, index=pd.Index(genes))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["synthetic"] = {"seed": seed, "knocked_down_genes": pert_names}
    return adata


def add_embedding(adata: ad.AnnData, *, embed_dim: int, key: str = "X_emb", seed: int = 0) -> None:
    """A small cell embedding: PCA of ``obsm['X_hvg']`` (or X) padded with noise if too few components."""
    source = adata.obsm["X_hvg"] if "X_hvg" in adata.obsm else adata.X
    dense = np.asarray(source.toarray() if sp.issparse(source) else source, dtype=np.float64)
    centered = dense - dense.mean(axis=0)
    n_comp = min(embed_dim, *centered.shape)
    u, s, _ = np.linalg.svd(centered, full_matrices=False)
    emb = np.zeros((adata.n_obs, embed_dim))
    emb[:, :n_comp] = u[:, :n_comp] * s[:n_comp]
    if n_comp < embed_dim:
        emb[:, n_comp:] = np.random.default_rng(seed).normal(size=(adata.n_obs, embed_dim - n_comp))
    adata.obsm[key] = emb.astype(np.float32)


def make_processed_adata(*, n_hvgs: int = 50, embed_dim: int | None = None, **kwargs) -> ad.AnnData:
    """Raw counts from :func:`make_perturbation_adata`, processed like ``state tx preprocess_train``."""
    from state.tx.preprocess import normalize_log1p_hvg

    adata = make_perturbation_adata(**kwargs)
    normalize_log1p_hvg(adata, num_hvgs=n_hvgs)
    if embed_dim:
        add_embedding(adata, embed_dim=embed_dim, seed=kwargs.get("seed", 0))
    return adata


def make_processed_dataset(
    directory: str | os.PathLike,
    *,
    n_hvgs: int = 50,
    embed_dim: int | None = None,
    filename: str = "synthetic.h5ad",
    **kwargs,
) -> Path:
    """Write a training-ready h5ad into ``directory`` and return its path.

    The file has what ``preprocess_train`` writes: CSR float32 log1p-normalized X, ``obsm['X_hvg']``
    (dense float32), var ``highly_variable/means/dispersions/dispersions_norm``, uns ``log1p``/``hvg``,
    plus ``obsm['X_emb']`` when ``embed_dim`` is given. ``kwargs`` go to :func:`make_perturbation_adata`.
    """
    path = Path(directory) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    make_processed_adata(n_hvgs=n_hvgs, embed_dim=embed_dim, **kwargs).write_h5ad(path)
    return path


def _labels_in_file(path: Path, *, celltype_col: str, pert_col: str, control: str) -> tuple[list, list]:
    """Cell types and non-control perturbations (sorted) of an h5ad, or of every h5/h5ad directly in a
    folder as cell-load would read it; only obs is read."""
    import h5py
    from anndata.io import read_elem

    files = sorted(path.glob("*.h5")) + sorted(path.glob("*.h5ad")) if path.is_dir() else [path]
    celltypes: set[str] = set()
    perts: set[str] = set()
    for file in files:
        with h5py.File(file, "r") as handle:
            obs = read_elem(handle["obs"])
        celltypes.update(obs[celltype_col].astype(str))
        perts.update(obs[pert_col].astype(str))
    perts.discard(control)
    return sorted(celltypes), sorted(perts)


def default_splits(kind: str, celltypes: list[str], perts: list[str]) -> tuple[dict, dict]:
    """(zeroshot, fewshot) tables for a split ``kind``: the last cell type is held out (zeroshot) or
    partly held out (fewshot: one val perturbation, two test perturbations); ``mixed`` does both, on
    different cell types."""
    last, first = celltypes[-1], celltypes[0]
    held = {"val": perts[:1], "test": perts[1:3]}
    if kind == "zeroshot":
        zeroshot = {last: "test"}
        if len(celltypes) >= 3:
            zeroshot[celltypes[-2]] = "val"
        return zeroshot, {}
    if kind == "fewshot":
        return {}, {last: held}
    if kind == "mixed":
        if len(celltypes) < 2:
            raise ValueError("a mixed split needs at least two cell types")
        return {last: "test"}, {first: held}
    raise ValueError(f"unknown split kind {kind!r}; expected zeroshot, fewshot or mixed")


def write_toml(
    path: str | os.PathLike,
    *,
    dataset_name: str,
    data_path: str | os.PathLike,
    kind: str = "zeroshot",
    zeroshot: dict[str, str] | None = None,
    fewshot: dict[str, dict[str, list[str]]] | None = None,
    train: bool = True,
    celltype_col: str = "cell_type",
    pert_col: str = "gene",
    control: str = CONTROL_LABEL,
) -> Path:
    """Write a cell-load TOML split file and return its path.

    ``zeroshot`` maps cell type -> ``"train"|"val"|"test"``; ``fewshot`` maps cell type ->
    ``{"val": [...], "test": [...]}`` (cell type names without the ``dataset.`` prefix). When both
    are None, :func:`default_splits` derives them from the labels in ``data_path`` (a file).
    ``data_path`` is written as given, so a relative path stays relative (cell-load resolves it
    against the working directory).
    """
    if zeroshot is None and fewshot is None:
        celltypes, perts = _labels_in_file(
            Path(data_path), celltype_col=celltype_col, pert_col=pert_col, control=control
        )
        zeroshot, fewshot = default_splits(kind, celltypes, perts)
    q = _toml_string
    lines = ["[datasets]", f"{q(dataset_name)} = {q(str(data_path))}", ""]
    if train:
        lines += ["[training]", f'{q(dataset_name)} = "train"', ""]
    if zeroshot:
        lines += ["[zeroshot]", *(f"{q(f'{dataset_name}.{ct}')} = {q(s)}" for ct, s in zeroshot.items()), ""]
    for ct, table in (fewshot or {}).items():
        lines.append(f"[fewshot.{q(f'{dataset_name}.{ct}')}]")
        for split in ("val", "test"):
            lines.append(f"{split} = [{', '.join(q(p) for p in table.get(split, []))}]")
        lines.append("")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def _toml_string(value: str) -> str:
    # TOML basic strings share JSON's escapes for the characters that can occur in names and paths.
    import json

    return json.dumps(value)
