"""SE training data: dataset tables, streaming h5ad rows, gene mappings and the sentence collator."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from state.emb.data import (
    DatasetEntry,
    H5adCellDataset,
    H5RowReader,
    SentenceCollator,
    SentenceSpec,
    build_dataset_genes,
    read_dataset_table,
)
from state.emb.data.collator import to_log_space
from state.emb.data.gene_mapping import DatasetGenes
from state.emb.data.synthetic import make_se_corpus
from state.utils.errors import StateError

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "emb" / "se_tiny"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_se_corpus(tmp_path_factory.mktemp("se_corpus"), dense_datasets=("train_1",), seed=3)


def _table(corpus, tmp_path: Path, *, extra_rows: list[dict] | None = None) -> Path:
    rows = []
    for name, path in corpus.h5ads.items():
        adata = ad.read_h5ad(path, backed="r")
        rows.append({"species": "human", "path": str(path), "names": name,
                     "num_cells": adata.n_obs, "num_genes": adata.n_vars})
    rows += extra_rows or []
    csv = tmp_path / "table.csv"
    pd.DataFrame(rows[::-1] + rows[:1]).to_csv(csv, index=False)  # reversed + a duplicate row
    return csv


def _genes_for(entries, corpus) -> dict[str, DatasetGenes]:
    vocab = list(torch.load(corpus.gene_embeddings))
    index = {g: i for i, g in enumerate(vocab)}
    mapping = {}
    for e in entries:
        names = ad.read_h5ad(e.path, backed="r").var_names
        mapping[e.name] = torch.tensor([index.get(g, -1) for g in names])
    return build_dataset_genes(entries, ds_emb_mapping=mapping, valid_genes_masks=None,
                               vocab_size=len(vocab), mapping_path="mapping.torch")


def test_dataset_table_is_deduplicated_and_sorted_by_name(corpus, tmp_path):
    entries = read_dataset_table(_table(corpus, tmp_path), split="train")
    assert [e.name for e in entries] == sorted(corpus.h5ads)
    assert all(e.num_genes == 94 for e in entries)


def test_dataset_table_missing_num_genes_defaults_to_8000(corpus, tmp_path):
    csv = tmp_path / "t.csv"
    path = corpus.h5ads["val_0"]
    pd.DataFrame([{"names": "v", "path": str(path), "num_cells": 3, "num_genes": np.nan}]).to_csv(csv, index=False)
    assert read_dataset_table(csv, split="val")[0].num_genes == 8000


def test_dataset_table_naming_missing_h5ad_is_one_line_error(corpus, tmp_path):
    missing = {"names": "ghost", "path": str(tmp_path / "ghost.h5ad"), "num_cells": 5, "num_genes": 10}
    with pytest.raises(StateError, match=r"1 missing h5ad file\(s\): ghost ->"):
        read_dataset_table(_table(corpus, tmp_path, extra_rows=[missing]), split="train")


def test_h5_reader_rows_match_anndata_for_csr_and_dense(corpus):
    reader = H5RowReader(max_open_files=1)  # forces closing and reopening between files
    for name in ("train_0", "train_1"):
        adata = ad.read_h5ad(corpus.h5ads[name])
        dense = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        for row in (0, 7, adata.n_obs - 1):
            np.testing.assert_array_equal(reader.read_row(corpus.h5ads[name], row, adata.n_vars), dense[row])
    assert reader.encoding(corpus.h5ads["train_1"]) == "array"
    assert reader.encoding(corpus.h5ads["train_0"]) == "csr_matrix"


def test_h5_reader_rejects_wrong_gene_count(corpus):
    with pytest.raises(StateError, match="table says 50"):
        H5RowReader().read_row(corpus.h5ads["train_1"], 0, 50)


def test_cell_dataset_walks_datasets_in_name_order(corpus, tmp_path):
    entries = read_dataset_table(_table(corpus, tmp_path), split="train")
    dataset = H5adCellDataset(entries)
    assert len(dataset) == sum(e.num_cells for e in entries)
    first = entries[0].num_cells
    row, idx, name, num = dataset[first]  # first cell of the second dataset
    assert (idx, name, num) == (first, entries[1].name, 1)
    assert row.shape == (entries[1].num_genes,)


def test_genes_without_embedding_are_dropped_and_counted(corpus, tmp_path, state_log):
    entries = read_dataset_table(_table(corpus, tmp_path), split="train")
    genes = _genes_for(entries, corpus)
    assert "train_0: 4 of 94" in state_log.text
    g = genes["train_0"]
    assert int(g.valid_mask.sum()) == 90
    cols = torch.nonzero(g.valid_mask).flatten()
    assert torch.equal(g.global_to_local[g.ds_emb_mapping[cols]], cols)


def test_dataset_without_usable_genes_or_mapping_is_an_error(tmp_path):
    entry = DatasetEntry(name="d", path=tmp_path / "d.h5ad", num_cells=2, num_genes=3)
    with pytest.raises(StateError, match="no gene with an embedding"):
        build_dataset_genes([entry], ds_emb_mapping={"d": torch.tensor([-1, -1, -1])}, valid_genes_masks=None,
                            vocab_size=5, mapping_path="m")
    with pytest.raises(StateError, match="no entry in the gene mapping"):
        build_dataset_genes([entry], ds_emb_mapping={}, valid_genes_masks=None, vocab_size=5, mapping_path="m")


def test_log_space_heuristic():
    raw = torch.tensor([0.0, 1.0, 40.0])
    assert torch.allclose(to_log_space(raw), torch.log1p(raw))
    logged = torch.tensor([0.0, 0.7, 3.0])
    assert torch.equal(to_log_space(logged), logged)
    assert torch.equal(to_log_space(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))


def _one_dataset_genes(n_genes: int, vocab_size: int, unknown: tuple[int, ...] = ()) -> DatasetGenes:
    mapping = torch.randperm(vocab_size)[:n_genes]
    mapping[list(unknown)] = -1
    entry = DatasetEntry(name="d", path=Path("d"), num_cells=1, num_genes=n_genes)
    return build_dataset_genes([entry], ds_emb_mapping={"d": mapping}, valid_genes_masks=None,
                               vocab_size=vocab_size, mapping_path="m")["d"]


def test_collator_batch_layout_and_task_gene_rules():
    torch.manual_seed(0)
    spec = SentenceSpec(pad_length=16, P=6, N=5, S=4)
    genes = _one_dataset_genes(30, 50, unknown=(0, 1))
    rows = [np.zeros(30, np.float32) for _ in range(3)]
    rows[0][2:12] = np.arange(1, 11) + 40  # raw counts, 10 expressed
    rows[1][5:8] = [1.0, 2.0, 3.0]  # log1p values, 3 expressed (fewer than the 15 sentence slots)
    rows[2][:] = 0.0  # nothing expressed: uniform weights
    batch = SentenceCollator(spec, {"d": genes}, vocab_size=50)([(r, i, "d", 0) for i, r in enumerate(rows)])
    ids, task_ids, y, idx, filtered, mask, total, counts, ds_nums = batch
    assert ids.shape == counts.shape == mask.shape == (3, 16) and ids.dtype == torch.int32
    assert task_ids.shape == y.shape == (3, 15)
    assert torch.equal(idx, torch.tensor([0, 1, 2], dtype=torch.int32)) and not mask.any()
    valid_ids = set(genes.valid_global_ids.tolist())
    assert set(ids.flatten().tolist()) <= valid_ids
    # cell 0: the 10 expressed genes come first, highest first; counts are 100 x the expression share
    x0 = torch.log1p(torch.tensor(rows[0]))[genes.valid_mask]
    order = torch.argsort(x0, descending=True)[:10]
    assert torch.equal(ids[0, 1:11].long(), genes.valid_global_ids[order])
    assert torch.allclose(counts[0, 1:11], 100 * x0[order] / x0.sum())
    # positives are expressed, negatives have log value < 1, shared genes are the same for all cells
    assert (y[0, :6] > 0).all() and (y[:2, 6:11] < 1).all()
    assert (task_ids[:, 11:] == task_ids[0, 11:]).all()
    assert torch.allclose(total, y.sum(dim=1))
    assert torch.allclose(counts[2, 1:], torch.full((15,), 100 / 28))  # uniform over the 28 usable genes
    assert filtered.shape == (3, 30) and torch.equal(ds_nums, torch.zeros(3, dtype=torch.int32))


def test_collator_cross_entropy_binarises_and_drops_shared_genes():
    spec = SentenceSpec(pad_length=8, P=3, N=3, S=4, loss_name="cross_entropy")
    genes = _one_dataset_genes(10, 20)
    row = np.array([0, 5, 0, 2, 0, 0, 1, 0, 3, 0], np.float32)
    _, task_ids, y, *_ = SentenceCollator(spec, {"d": genes}, vocab_size=20)([(row, 0, "d", 0)])
    assert task_ids.shape == (1, 6) and set(y.flatten().tolist()) <= {0.0, 1.0}


def test_collator_reproduces_fixture_sentences():
    """arc-state's sentences for the deterministic fixture input (no ties, no zero-gene filler)."""
    expected = np.load(FIXTURE / "expected_det.npz", allow_pickle=False)
    adata = ad.read_h5ad(FIXTURE / "input_det.h5ad")
    mapping = torch.from_numpy(expected["ds_emb_map"])
    entry = DatasetEntry(name="input_det", path=Path("x"), num_cells=adata.n_obs, num_genes=adata.n_vars)
    genes = build_dataset_genes([entry], ds_emb_mapping={"input_det": mapping}, valid_genes_masks=None,
                                vocab_size=len(expected["vocab"]), mapping_path="m")
    spec = SentenceSpec(pad_length=64, P=16, N=16, S=16)
    collator = SentenceCollator(spec, genes, vocab_size=len(expected["vocab"]), training=False)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    order = expected["cell_idx"]
    batch = collator([(x[i], int(i), "input_det", 0) for i in order])
    np.testing.assert_array_equal(batch[0].numpy(), expected["sentence_ids"])
    np.testing.assert_allclose(batch[7].numpy(), expected["sentence_counts"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch[4][:, :180].numpy(), expected["cell_filtered_log_counts"], atol=1e-6)
