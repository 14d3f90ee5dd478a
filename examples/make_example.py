"""Regenerate the bundled example data set and its split files.

    python examples/make_example.py            # from the repository root

Writes examples/data/example.h5ad (synthetic Perturb-seq, already run through
``state tx preprocess_train``) and examples/{zeroshot,fewshot,mixed}.toml, whose dataset paths are
relative to the repository root (cell-load opens them relative to the working directory).
The data come from :mod:`state.datasets.synthetic`, the generator the tests use.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anndata as ad

from state.datasets.synthetic import add_embedding, default_splits, make_perturbation_adata, write_toml
from state.io.atomic import atomic_write_h5ad
from state.tx.preprocess import preprocess_train

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("examples/data/example.h5ad")  # as written into the TOMLs: relative to the repo root
SETTINGS = dict(n_cells=2400, n_genes=200, n_perts=10, n_celltypes=3, n_batches=3, seed=20250101,
                counts_per_gene=1.0, control_fraction=0.25)
NUM_HVGS = 64
EMBED_DIM = 16


def main() -> int:
    target = ROOT / DATA
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.h5ad"
        make_perturbation_adata(**SETTINGS).write_h5ad(raw)
        processed = preprocess_train(raw, Path(tmp) / "processed.h5ad", num_hvgs=NUM_HVGS)
        adata = ad.read_h5ad(processed)
    add_embedding(adata, embed_dim=EMBED_DIM, key="X_emb", seed=SETTINGS["seed"])
    # Atomic: readers of the old file (a running training) keep it; h5py/cell-load read gzip transparently.
    atomic_write_h5ad(adata, target, compression="gzip")

    celltypes = sorted(adata.obs["cell_type"].cat.categories)
    perts = sorted(p for p in adata.obs["gene"].cat.categories if p != "non-targeting")
    for kind in ("zeroshot", "fewshot", "mixed"):
        zeroshot, fewshot = default_splits(kind, celltypes, perts)
        write_toml(ROOT / "examples" / f"{kind}.toml", dataset_name="example", data_path=DATA.as_posix(),
                   zeroshot=zeroshot, fewshot=fewshot)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB): {adata.n_obs} cells x {adata.n_vars} genes, "
          f"{adata.obsm['X_hvg'].shape[1]} HVGs, cell types {celltypes}, perturbations {perts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
