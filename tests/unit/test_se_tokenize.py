"""Cell sentences (spec emb §5.3-5.4): gene-name detection, ranking, filler, counts, seeding."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from state.emb.tokenize import SentenceBuilder, block_rng, detect_gene_names, map_genes
from state.utils.errors import StateError

VOCAB = {f"G{i}": i for i in range(100)}


def _var(index, **columns) -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.Index(index))


def test_detection_prefers_largest_overlap_and_index_on_ties():
    var = _var([f"G{i}" for i in range(5)], sym=[f"G{i}" for i in range(5)], other=["x"] * 5)
    assert detect_gene_names(var, VOCAB)[0] is None
    var = _var([f"E{i}" for i in range(20)], a=[f"G{i}" for i in range(10)] + ["x"] * 10,
               b=[f"G{i}" for i in range(15)] + ["y"] * 5)
    column, overlaps = detect_gene_names(var, VOCAB)
    assert column == "b" and overlaps == {"var.index": 0, "var.a": 10, "var.b": 15}
    assert map_genes(var, VOCAB).source == "var.b"


def test_index_with_any_match_wins_like_arc_state(caplog):
    var = _var([f"G{i}" for i in range(12)] + [f"E{i}" for i in range(8)], sym=[f"G{i}" for i in range(20)])
    with caplog.at_level(logging.WARNING):
        mapping = map_genes(var, VOCAB)
    assert mapping.source == "var.index" and mapping.n_mapped == 12
    assert "--gene-column sym" in caplog.text
    assert map_genes(var, VOCAB, gene_column="sym").n_mapped == 20


def test_gene_mapping_errors_name_the_problem():
    var = _var([f"E{i}" for i in range(20)], sym=["x"] * 20)
    with pytest.raises(StateError, match="no gene names in var.index or any var column"):
        map_genes(var, VOCAB)
    with pytest.raises(StateError, match="no var column 'gene_name'.*sym"):
        map_genes(var, VOCAB, gene_column="gene_name")
    few = _var([f"G{i}" for i in range(3)] + [f"E{i}" for i in range(17)])
    with pytest.raises(StateError, match="only 3 of 20 genes"):
        map_genes(few, VOCAB)


def _builder(n_genes=100, pad_length=11, names=None):
    var = _var(names or [f"G{i}" for i in range(n_genes)])
    return SentenceBuilder(map_genes(var, VOCAB), pad_length=pad_length, cls_token_idx=3)


def test_raw_counts_are_log1p_and_top_genes_fill_the_sentence():
    row = np.zeros((1, 100), np.float32)
    row[0, 10:30] = np.arange(1, 21) * 3.0  # max 60 > 35 -> raw
    ids, counts = _builder().build(sp.csr_matrix(row), block_rng(0, 0))
    logged = np.log1p(row[0])
    assert set(ids[0, 1:]) == set(range(20, 30))  # the 10 largest
    np.testing.assert_allclose(counts[0, 1:], 100 * logged[ids[0, 1:]] / logged.sum(), rtol=1e-5)
    assert ids[0, 0] == 3 and counts[0, 0] == 0.0  # CLS slot: local gene 3 (unexpressed here)
    assert np.all(np.diff(counts[0, 1:]) <= 0)  # descending


def test_log_input_is_kept_and_cls_slot_uses_local_gene_three():
    row = np.zeros((1, 100), np.float32)
    row[0, :40] = np.linspace(0.1, 4.0, 40)
    ids, counts = _builder().build(sp.csr_matrix(row), block_rng(0, 0))
    assert counts[0, 0] == pytest.approx(100 * row[0, 3] / row[0].sum(), rel=1e-5)


def test_filler_without_replacement_when_vocab_is_large_and_with_it_otherwise():
    row = np.zeros((2, 100), np.float32)
    row[:, :3] = 5.0
    ids, counts = _builder(pad_length=51).build(sp.csr_matrix(row), block_rng(0, 0))
    assert all(len(set(r[1:])) == 50 for r in ids)  # 3 expressed + 47 distinct zero genes
    assert np.all(counts[:, 4:] == 0)
    small = _builder(n_genes=20, pad_length=51, names=[f"G{i}" for i in range(20)])
    ids, _ = small.build(sp.csr_matrix(row[:, :20]), block_rng(0, 0))
    assert set(ids[0, 1:]) <= set(range(20)) and set(range(3)) <= set(ids[0, 1:4])


def test_empty_cell_gets_uniform_weights_and_negatives_and_nans_are_zero():
    row = np.zeros((2, 100), np.float32)
    row[1, 5] = -3.0
    row[1, 6] = np.nan
    builder = _builder()
    _, counts = builder.build(sp.csr_matrix(row), block_rng(0, 0))
    np.testing.assert_allclose(counts, 100 / 100)
    assert builder.nan_cells == 1


def test_ties_are_random_but_reproducible_with_a_seed():
    row = np.ones((1, 100), np.float32)  # all tied
    builder = _builder()
    a = builder.build(sp.csr_matrix(row), block_rng(5, 0))[0]
    b = builder.build(sp.csr_matrix(row), block_rng(5, 0))[0]
    c = builder.build(sp.csr_matrix(row), block_rng(6, 0))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_genes_outside_the_vocabulary_are_dropped():
    names = [f"G{i}" for i in range(50)] + [f"X{i}" for i in range(50)]
    row = np.zeros((1, 100), np.float32)
    row[0, 50:] = 9.0  # only non-vocabulary genes expressed
    row[0, 7] = 1.0
    ids, counts = _builder(names=names).build(sp.csr_matrix(row), block_rng(0, 0))
    assert ids[0, 1] == 7 and counts[0, 1] == pytest.approx(100.0)
    assert ids.max() < 50
