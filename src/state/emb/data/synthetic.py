"""A toy SE corpus for tests, the example and the benchmark (like scvi's ``synthetic_iid``).

:func:`make_se_corpus` writes a few raw-count CSR h5ad files whose genes come from a random gene
vocabulary, the gene-embedding dict, and the train / validation CSVs that ``state emb preprocess``
reads. Everything is derived from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch


@dataclass
class SECorpus:
    root: Path
    gene_embeddings: Path
    train_csv: Path
    val_csv: Path
    h5ads: dict[str, Path]


def make_se_corpus(
    root: str | Path,
    *,
    n_vocab: int = 120,
    width: int = 16,
    train_cells: tuple[int, ...] = (48, 40),
    val_cells: tuple[int, ...] = (24,),
    genes_per_dataset: int = 90,
    n_unknown_genes: int = 4,
    dense_datasets: tuple[str, ...] = (),
    vocabulary: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> SECorpus:
    """Write the corpus under ``root``; dataset names are ``train_<i>`` and ``val_<i>``.

    Each dataset holds a random subset of the vocabulary (shuffled column order) plus
    ``n_unknown_genes`` genes without an embedding; counts are gamma-Poisson, so cells express
    different numbers of genes. Datasets named in ``dense_datasets`` get a dense ``X``.
    ``vocabulary`` (gene -> vector) replaces the random vocabulary of ``n_vocab`` x ``width``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "h5ad").mkdir(parents=True, exist_ok=True)
    if vocabulary is None:
        names = [f"GENE{i:04d}" for i in range(n_vocab)]
        vocabulary = {g: torch.from_numpy(rng.standard_normal(width).astype(np.float32)) for g in names}
    vectors = dict(vocabulary)
    vocab = list(vectors)
    n_vocab = len(vocab)
    embeddings_path = root / "gene_embeddings.pt"
    torch.save(vectors, embeddings_path)
    h5ads: dict[str, Path] = {}
    tables = {}
    for split, sizes in (("train", train_cells), ("val", val_cells)):
        rows = []
        for i, n_cells in enumerate(sizes):
            name = f"{split}_{i}"
            genes = list(rng.choice(vocab, size=min(genes_per_dataset, n_vocab), replace=False))
            genes += [f"UNKNOWN{i}_{j}" for j in range(n_unknown_genes)]
            path = root / "h5ad" / f"{name}.h5ad"
            _write_counts(path, genes, n_cells, rng, dense=name in dense_datasets)
            h5ads[name] = path
            rows.append({"species": "human", "path": str(path), "names": name})
        tables[split] = root / f"{split}.csv"
        pd.DataFrame(rows).to_csv(tables[split], index=False)
    return SECorpus(root, embeddings_path, tables["train"], tables["val"], h5ads)


def _write_counts(path: Path, genes: list[str], n_cells: int, rng: np.random.Generator, *, dense: bool) -> None:
    rate = rng.gamma(shape=0.6, scale=3.0, size=(n_cells, len(genes))) * rng.uniform(0.2, 1.5, (n_cells, 1))
    counts = rng.poisson(rate).astype(np.float32)
    counts[:, 0] += 40  # a large raw count, so every cell is recognised as raw counts
    x = counts if dense else sp.csr_matrix(counts)
    var = pd.DataFrame({"gene_name": genes}, index=pd.Index(genes))
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
