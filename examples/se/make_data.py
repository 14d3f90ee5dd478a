"""Regenerate the toy data of this example (already checked in; run from the repository root).

    python examples/se/make_data.py

Writes examples/se/data/: three raw-count h5ad files (two for training, one for validation) whose
genes come from a random 200-gene vocabulary with 32-wide vectors, then runs `state emb preprocess`
on them, so data/ also holds the profile files that config.yaml points at. Paths inside the CSVs
are relative to data/, so the example works from any checkout location.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from state.emb.data.synthetic import make_se_corpus
from state.emb.preprocess import preprocess

HERE = Path(__file__).resolve().parent


def main() -> None:
    data = HERE / "data"
    shutil.rmtree(data, ignore_errors=True)
    corpus = make_se_corpus(data, n_vocab=200, width=32, train_cells=(320, 320), val_cells=(96,),
                            genes_per_dataset=150, n_unknown_genes=5, seed=2024)
    for csv in (corpus.train_csv, corpus.val_csv):  # h5ad paths relative to the CSV's folder
        table = pd.read_csv(csv)
        table["path"] = [str(Path(p).relative_to(data)) for p in table["path"]]
        table.to_csv(csv, index=False)
    cwd = Path.cwd()
    os.chdir(data)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            preprocess(profile_name="example", train_csv="train.csv", val_csv="val.csv", output_dir=".",
                       config_file=Path(tmp) / "profile.yaml", all_embeddings="gene_embeddings.pt")
    finally:
        os.chdir(cwd)
    for name in ("train.csv", "val.csv", "gene_embeddings.pt"):  # inputs; the profile has copies
        (data / name).unlink()
    print(f"wrote {data}")


if __name__ == "__main__":
    main()
