"""`state emb transform` / `state emb query` end to end on the se_tiny checkpoint and synthetic data,
including every bad-input path (one line, exit 2, nothing written)."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helpers.synthetic import make_perturbation_adata
from state.__main__ import main
from state.emb import embed_anndata
from state.emb.transform import transform
from state.utils.errors import StateError

SE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "emb" / "se_tiny"
MODEL = str(SE / "model")


def _cells(n_cells=300, seed=0, n_vocab=150) -> ad.AnnData:
    """Raw counts over 150 vocabulary genes (SEG names in var.index) + 10 unknown genes."""
    adata = make_perturbation_adata(n_cells=n_cells, n_genes=n_vocab + 10, seed=seed, counts_per_gene=6.0)
    adata.var["symbol"] = adata.var_names.astype(str)
    adata.var_names = [f"SEG{i:03d}" for i in range(n_vocab)] + [f"NOPE{i}" for i in range(10)]
    adata.obs["n_counts"] = np.asarray(adata.X.sum(1)).ravel()
    return adata


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("se_data")
    _cells().write_h5ad(folder / "ref.h5ad")
    _cells(n_cells=40, seed=1).write_h5ad(folder / "query.h5ad")
    return folder


def _run(*argv) -> int:
    return main(["emb", *argv])


def _fails(capsys, *argv, match: str) -> None:
    assert _run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_transform_outputs_agree_and_stream(data_dir, tmp_path):
    src = data_dir / "ref.h5ad"
    assert _run("transform", "--model-folder", MODEL, "--input", str(src), "--output", str(tmp_path / "o.h5ad"),
                "--seed", "4", "--embed-key", "X_se") == 0
    assert _run("transform", "--model-folder", MODEL, "--input", str(src), "--output", str(tmp_path / "o.NPY"),
                "--seed", "4") == 0
    out = ad.read_h5ad(tmp_path / "o.h5ad")
    emb = out.obsm["X_se"]
    np.testing.assert_array_equal(np.load(tmp_path / "o.NPY"), emb)
    assert emb.shape == (300, 42)
    original = ad.read_h5ad(src)
    assert (out.X != original.X).nnz == 0 and out.obs.equals(original.obs)
    # small streaming chunks, other batch size, in-memory API: same numbers
    streamed = transform(src, output=tmp_path / "s.npy", model_folder=MODEL, seed=4, chunk_rows=1, batch_size=7)
    assert streamed.n_cells == 300
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), emb)
    np.testing.assert_array_equal(embed_anndata(original, model_folder=MODEL, seed=4, embed_key="k"), emb)
    assert "k" in original.obsm


def test_dense_and_small_csc_inputs_give_the_same_embeddings(data_dir, tmp_path):
    adata = ad.read_h5ad(data_dir / "ref.h5ad")[:50].copy()
    adata.write_h5ad(tmp_path / "csr.h5ad")
    dense = adata.copy()
    dense.X = adata.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    csc = adata.copy()
    csc.X = sp.csc_matrix(adata.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    results = {}
    for name in ("csr", "dense", "csc"):
        transform(tmp_path / f"{name}.h5ad", output=tmp_path / f"{name}_out.h5ad", model_folder=MODEL, seed=2)
        results[name] = ad.read_h5ad(tmp_path / f"{name}_out.h5ad")
    np.testing.assert_array_equal(results["dense"].obsm["X_state"], results["csr"].obsm["X_state"])
    np.testing.assert_array_equal(results["csc"].obsm["X_state"], results["csr"].obsm["X_state"])
    assert sp.issparse(results["csc"].X) and results["csc"].X.format == "csr"  # arc-state writes CSR
    with pytest.raises(StateError, match="X is CSC with .* convert X to CSR"):
        transform(tmp_path / "csc.h5ad", output=tmp_path / "never.h5ad", model_folder=MODEL, max_csc_nnz=10)
    assert not (tmp_path / "never.h5ad").exists()


def test_lancedb_append_and_batched_query(data_dir, tmp_path, capsys):
    db = tmp_path / "db"
    for name in ("ref", "query"):
        assert _run("transform", "--model-folder", MODEL, "--input", str(data_dir / f"{name}.h5ad"),
                    "--output", str(tmp_path / f"{name}.h5ad"), "--lancedb", str(db), "--seed", "1") == 0
    import lancedb

    table = lancedb.connect(str(db)).open_table("state_embeddings")
    assert table.count_rows() == 340
    assert [f.name for f in table.schema][:4] == ["vector", "cell_id", "embedding_key", "dataset"]
    stored = table.to_pandas()
    assert set(stored["dataset"]) == {"ref", "query"}

    out = tmp_path / "hits.csv"
    assert _run("query", "--lancedb", str(db), "--input", str(tmp_path / "query.h5ad"), "--output", str(out),
                "--k", "4", "--batch-size", "16") == 0
    hits = pd.read_csv(out)
    obs_cols = [c for c in stored.columns if c not in ("vector", "cell_id", "embedding_key", "dataset")]
    assert list(hits.columns) == ["cell_id", "embedding_key", "dataset", *obs_cols,
                                  "query_distance", "query_cell_id", "query_rank"]
    assert len(hits) == 160 and list(hits["query_rank"][:4]) == [1, 2, 3, 4]
    query_obs = ad.read_h5ad(tmp_path / "query.h5ad")
    assert list(hits["query_cell_id"].iloc[::4]) == list(query_obs.obs_names)
    # brute force: squared L2 distances, same neighbours
    vectors = np.stack(stored["vector"].to_numpy())
    q = query_obs.obsm["X_state"]
    d2 = ((q[:, None, :] - vectors[None]) ** 2).sum(-1)
    nearest = np.sort(d2, axis=1)[:, :4]
    np.testing.assert_allclose(hits["query_distance"].to_numpy().reshape(40, 4), nearest, rtol=1e-4, atol=1e-5)

    pq = tmp_path / "hits.parquet"
    assert _run("query", "--lancedb", str(db), "--input", str(tmp_path / "query.h5ad"), "--output", str(pq),
                "--exclude-distances", "--filter", "dataset = 'ref'") == 0
    frame = pd.read_parquet(pq)
    assert "query_distance" not in frame.columns and set(frame["dataset"]) == {"ref"} and len(frame) == 120
    _fails(capsys, "query", "--lancedb", str(db), "--input", str(tmp_path / "query.h5ad"),
           "--output", str(tmp_path / "x.csv"), "--filter", "no_such_col = 1", match="LanceDB rejected --filter")


def test_transform_bad_inputs_fail_in_one_line_and_write_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    base = ["transform", "--model-folder", MODEL, "--output", str(out)]
    _fails(capsys, *base, "--input", str(tmp_path / "missing.h5ad"), match="does not exist")
    (tmp_path / "text.h5ad").write_text("not hdf5")
    _fails(capsys, *base, "--input", str(tmp_path / "text.h5ad"), match="is not an h5ad file")
    _fails(capsys, "transform", "--model-folder", MODEL, "--input", str(data_dir / "ref.h5ad"),
           match="nothing to write")

    no_names = _cells(n_cells=20)
    no_names.var_names = [f"E{i}" for i in range(no_names.n_vars)]
    no_names.var = no_names.var[[]]
    no_names.write_h5ad(tmp_path / "no_names.h5ad")
    _fails(capsys, *base, "--input", str(tmp_path / "no_names.h5ad"), match="no gene names in var.index")
    _fails(capsys, *base, "--input", str(data_dir / "ref.h5ad"), "--gene-column", "symbols",
           match="no var column 'symbols'")
    few = _cells(n_cells=20, n_vocab=5)
    few.write_h5ad(tmp_path / "few.h5ad")
    _fails(capsys, *base, "--input", str(tmp_path / "few.h5ad"), match="only 5 of 15 genes")

    run = tmp_path / "tx_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "var_dims.pkl").write_bytes(b"x")
    _fails(capsys, "transform", "--model-folder", str(run), "--input", str(data_dir / "ref.h5ad"),
           "--output", str(out), match="State Transition (tx) run directory")

    (tmp_path / "db_file").write_text("x")
    _fails(capsys, "transform", "--model-folder", MODEL, "--input", str(data_dir / "ref.h5ad"),
           "--lancedb", str(tmp_path / "db_file"), match="is a file, not a LanceDB database")
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    (stuff / "notes.txt").write_text("x")
    _fails(capsys, "transform", "--model-folder", MODEL, "--input", str(data_dir / "ref.h5ad"),
           "--lancedb", str(stuff), match="not a LanceDB database")
    assert not out.exists() and sorted(p.name for p in stuff.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.h5ad")]


def test_query_bad_inputs(data_dir, tmp_path, capsys):
    db = tmp_path / "db"
    assert _run("transform", "--model-folder", MODEL, "--input", str(data_dir / "query.h5ad"),
                "--output", str(tmp_path / "q.h5ad"), "--lancedb", str(db)) == 0
    base = ["query", "--lancedb", str(db), "--input", str(tmp_path / "q.h5ad")]
    _fails(capsys, *base, "--output", str(tmp_path / "hits.txt"), match="must end in .csv or .parquet")
    _fails(capsys, *base, "--output", str(tmp_path / "h.csv"), "--embed-key", "X_nope", match="no obsm['X_nope']")
    wrong = ad.read_h5ad(tmp_path / "q.h5ad")
    wrong.obsm["X_state"] = wrong.obsm["X_state"][:, :10]
    wrong.write_h5ad(tmp_path / "wrong.h5ad")
    _fails(capsys, "query", "--lancedb", str(db), "--input", str(tmp_path / "wrong.h5ad"),
           "--output", str(tmp_path / "h.csv"), match="has width 10, the table stores vectors of width 42")
    _fails(capsys, "query", "--lancedb", str(tmp_path / "nodb"), "--input", str(tmp_path / "q.h5ad"),
           "--output", str(tmp_path / "h.csv"), match="LanceDB database not found")
    _fails(capsys, "query", "--lancedb", str(data_dir), "--input", str(tmp_path / "q.h5ad"),
           "--output", str(tmp_path / "h.csv"), match="not a LanceDB database")
    assert not (tmp_path / "h.csv").exists()


def test_emb_eval_prints_metrics_on_cpu(tmp_path, capsys):
    adata = make_perturbation_adata(n_cells=120, n_genes=150, seed=3, counts_per_gene=6.0)
    adata.var_names = [f"SEG{i:03d}" for i in range(150)]
    adata.write_h5ad(tmp_path / "perturb.h5ad")
    ckpt = str(SE / "model" / "last.ckpt")
    assert _run("eval", "--checkpoint", ckpt, "--adata", str(tmp_path / "perturb.h5ad")) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"Mean top-200 DE overlap: [01]\.\d{4} over 6 perturbations", out[0]), out
    assert out[1].startswith("ROC AUC: ") and out[2].startswith("PR AUC: ")
    _fails(capsys, "eval", "--checkpoint", ckpt, "--adata", str(tmp_path / "perturb.h5ad"), "--pert-col", "nope",
           match="no obs column 'nope'")
