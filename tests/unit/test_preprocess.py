"""`state tx preprocess_train` / `preprocess_infer`: outputs checked against scanpy, and bad inputs through the CLI."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from helpers.synthetic import make_perturbation_adata
from state.__main__ import main
from state.tx.preprocess import preprocess_infer, preprocess_train, seurat_hvg_table
from state.utils.errors import StateError


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _scanpy_reference(raw: ad.AnnData, num_hvgs: int) -> ad.AnnData:
    ref = raw.copy()
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=num_hvgs, flavor="seurat")
    return ref


@pytest.fixture
def raw_path(tmp_path):
    path = tmp_path / "raw.h5ad"
    make_perturbation_adata(seed=1).write_h5ad(path)
    return path


@pytest.fixture
def processed_path(tmp_path, raw_path):
    return preprocess_train(raw_path, tmp_path / "processed.h5ad", num_hvgs=20)


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_preprocess_train_matches_scanpy(tmp_path, sparse):
    raw = make_perturbation_adata(seed=2, sparse=sparse)
    raw.write_h5ad(tmp_path / "raw.h5ad")
    out = preprocess_train(tmp_path / "raw.h5ad", tmp_path / "out" / "processed.h5ad", num_hvgs=25)
    got = ad.read_h5ad(out)
    ref = _scanpy_reference(raw, 25)

    assert sp.issparse(got.X) == sparse and got.X.dtype == np.float32
    np.testing.assert_allclose(_dense(got.X), _dense(ref.X), rtol=1e-6, atol=1e-6)
    hvg = got.var["highly_variable"].to_numpy()
    np.testing.assert_array_equal(hvg, ref.var["highly_variable"].to_numpy())
    assert hvg.sum() >= 25
    for column in ("means", "dispersions", "dispersions_norm"):
        np.testing.assert_allclose(got.var[column], ref.var[column], rtol=1e-6, equal_nan=True)
    x_hvg = got.obsm["X_hvg"]
    assert isinstance(x_hvg, np.ndarray) and x_hvg.dtype == np.float32
    np.testing.assert_array_equal(x_hvg, _dense(got.X)[:, hvg])
    assert got.uns["hvg"] == {"flavor": "seurat"} and "log1p" in got.uns
    pd.testing.assert_frame_equal(got.obs, raw.obs)
    np.testing.assert_array_equal(got.var_names, raw.var_names)


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")  # from the scanpy reference
@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_chunked_processing_matches_scanpy(tmp_path, monkeypatch, sparse):
    # Production chunks are larger than test data; shrink them so every chunked loop runs many times.
    from state.tx import preprocess

    monkeypatch.setattr(preprocess, "_ROW_CHUNK", 37)
    monkeypatch.setattr(preprocess, "_NNZ_CHUNK", 1000)
    raw = make_perturbation_adata(seed=5, sparse=sparse)
    raw.X[:2] *= 0  # two empty cells: they stay zero, and take part in the median as in scanpy
    if sparse:
        raw.X.eliminate_zeros()
    raw.write_h5ad(tmp_path / "raw.h5ad")
    got = ad.read_h5ad(preprocess_train(tmp_path / "raw.h5ad", tmp_path / "out.h5ad", num_hvgs=30))
    ref = _scanpy_reference(raw, 30)
    np.testing.assert_allclose(_dense(got.X), _dense(ref.X), rtol=1e-6, atol=1e-6)
    assert not _dense(got.X)[:2].any()
    np.testing.assert_array_equal(got.var["highly_variable"], ref.var["highly_variable"])
    np.testing.assert_allclose(got.var["dispersions_norm"], ref.var["dispersions_norm"], rtol=1e-5)
    np.testing.assert_array_equal(got.obsm["X_hvg"], _dense(got.X)[:, got.var["highly_variable"].to_numpy()])


def test_normalized_rows_sum_to_median_total(processed_path, raw_path):
    raw = ad.read_h5ad(raw_path)
    target = np.median(np.asarray(raw.X.sum(axis=1)).ravel())
    totals = np.asarray(np.expm1(ad.read_h5ad(processed_path).X).sum(axis=1)).ravel()
    np.testing.assert_allclose(totals, target, rtol=1e-4)


def test_hvg_table_ties_select_extra_genes_like_scanpy():
    # Five identical overdispersed genes tie, and genes alone in their mean bin all get exactly 1.0:
    # asking for 2 genes returns every gene at or above the 2nd-highest value, as scanpy does.
    rng = np.random.default_rng(0)
    noisy = rng.negative_binomial(1, 0.25, size=(300, 1)).astype(np.float32)
    others = rng.poisson(3.0, size=(300, 20)).astype(np.float32)
    X = np.log1p(np.hstack([np.repeat(noisy, 5, axis=1), others]))
    names = [f"g{i}" for i in range(X.shape[1])]
    ours = seurat_hvg_table(X, num_hvgs=2, var_names=names)
    ref = sc.pp.highly_variable_genes(ad.AnnData(X), n_top_genes=2, flavor="seurat", inplace=False)
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy())
    np.testing.assert_allclose(ours["dispersions_norm"], ref["dispersions_norm"], rtol=1e-6)
    assert ours["highly_variable"].sum() > 2


def test_input_is_log1p_keeps_x_and_selects_hvgs(tmp_path, processed_path):
    logged = ad.read_h5ad(processed_path)
    del logged.uns["log1p"], logged.obsm["X_hvg"]
    logged.var = logged.var[["gene_name"]]
    logged.write_h5ad(tmp_path / "logged.h5ad")
    with pytest.raises(StateError, match="--input-is-log1p"):
        preprocess_train(tmp_path / "logged.h5ad", tmp_path / "no.h5ad", num_hvgs=10)
    assert not (tmp_path / "no.h5ad").exists()

    out = preprocess_train(tmp_path / "logged.h5ad", tmp_path / "again.h5ad", num_hvgs=10, input_is_log1p=True)
    got = ad.read_h5ad(out)
    np.testing.assert_array_equal(_dense(got.X), _dense(logged.X))
    ref = sc.pp.highly_variable_genes(logged, n_top_genes=10, flavor="seurat", inplace=False)
    np.testing.assert_array_equal(got.var["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy())


def test_integer_storage_and_csc_are_accepted(tmp_path):
    raw = make_perturbation_adata(seed=4)
    expected = _scanpy_reference(raw, 15)
    raw.X = sp.csc_matrix(raw.X.astype(np.int32))
    raw.write_h5ad(tmp_path / "csc.h5ad")
    got = ad.read_h5ad(preprocess_train(tmp_path / "csc.h5ad", tmp_path / "out.h5ad", num_hvgs=15))
    assert got.X.format == "csr"
    np.testing.assert_allclose(got.X.toarray(), expected.X.toarray(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- preprocess_infer


def _template(path, tmp_path, name, seed):
    return ad.read_h5ad(
        preprocess_infer(path, tmp_path / name, control_condition="non-targeting", pert_col="gene", seed=seed)
    )


def test_preprocess_infer_replaces_perturbed_rows_with_control_rows(tmp_path, processed_path):
    src = ad.read_h5ad(processed_path)
    src.obsm["X_emb"] = np.arange(src.n_obs * 3, dtype=np.float32).reshape(-1, 3)  # row i identifiable
    src.write_h5ad(tmp_path / "with_emb.h5ad")
    out = _template(tmp_path / "with_emb.h5ad", tmp_path, "template.h5ad", seed=0)

    control = (src.obs["gene"] == "non-targeting").to_numpy()
    X_in, X_out = _dense(src.X), _dense(out.X)
    assert sp.issparse(out.X)
    pd.testing.assert_frame_equal(out.obs, src.obs)
    np.testing.assert_array_equal(X_out[control], X_in[control])
    np.testing.assert_array_equal(out.obsm["X_emb"][control], src.obsm["X_emb"][control])
    control_rows = np.flatnonzero(control)
    source = out.obsm["X_emb"][~control, 0].astype(int) // 3  # the control row each perturbed cell copied
    assert np.isin(source, control_rows).all()
    np.testing.assert_array_equal(X_out[~control], X_in[source])
    np.testing.assert_array_equal(out.obsm["X_hvg"][~control], src.obsm["X_hvg"][source])
    assert len(np.unique(source)) > 1


def test_preprocess_infer_is_deterministic_per_seed(tmp_path, processed_path):
    a = _template(processed_path, tmp_path, "a.h5ad", seed=7)
    b = _template(processed_path, tmp_path, "b.h5ad", seed=7)
    c = _template(processed_path, tmp_path, "c.h5ad", seed=8)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert not np.array_equal(a.X.toarray(), c.X.toarray())


def test_preprocess_infer_accepts_string_pert_column(tmp_path, processed_path):
    src = ad.read_h5ad(processed_path)
    src.obs["gene"] = src.obs["gene"].astype(str)
    src.write_h5ad(tmp_path / "strings.h5ad")
    out = _template(tmp_path / "strings.h5ad", tmp_path, "t.h5ad", seed=0)
    control = (src.obs["gene"] == "non-targeting").to_numpy()
    np.testing.assert_array_equal(out.X.toarray()[control], src.X.toarray()[control])
    assert not np.array_equal(out.X.toarray()[~control], src.X.toarray()[~control])


# ---------------------------------------------------------------- bad inputs via the CLI



def _write(adata, path):
    adata.write_h5ad(path)
    return path


def _bad_inputs(tmp_path, raw_path):
    """name -> (argv builder inputs): (command, input path, extra args)."""
    raw = ad.read_h5ad(raw_path)
    negative = raw.copy()
    negative.X.data[3] = -1.0
    nan = raw.copy()
    nan.X.data[5] = np.nan
    inf = raw.copy()
    inf.X.data[5] = np.inf
    logged = raw.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data)
    tagged = raw.copy()
    tagged.uns["log1p"] = {"base": None}
    unused = raw.copy()
    unused.obs["gene"] = unused.obs["gene"].cat.rename_categories({"non-targeting": "ctrl"})
    unused.obs["gene"] = unused.obs["gene"].cat.add_categories("non-targeting")
    empty = raw[:0].copy()
    (tmp_path / "notes.txt").write_text("not an h5ad\n")
    (tmp_path / "folder").mkdir()
    train = "preprocess_train"
    infer = "preprocess_infer"
    return {
        "missing file": (train, tmp_path / "absent.h5ad", []),
        "not an h5ad": (train, tmp_path / "notes.txt", []),
        "directory input": (train, tmp_path / "folder", []),
        "num_hvgs > genes": (train, raw_path, ["--num_hvgs", "101"]),
        "num_hvgs zero": (train, raw_path, ["--num_hvgs", "0"]),
        "negative counts": (train, _write(negative, tmp_path / "neg.h5ad"), []),
        "NaN": (train, _write(nan, tmp_path / "nan.h5ad"), []),
        "inf": (train, _write(inf, tmp_path / "inf.h5ad"), []),
        "log1p values": (train, _write(logged, tmp_path / "logged.h5ad"), []),
        "uns log1p": (train, _write(tagged, tmp_path / "tagged.h5ad"), []),
        "no cells": (train, _write(empty, tmp_path / "empty.h5ad"), []),
        "output under a file": (train, raw_path, ["--output", str(raw_path / "out.h5ad")]),
        "output is input": (train, raw_path, ["--output", str(raw_path)]),
        "output is a folder": (train, raw_path, ["--output", str(tmp_path / "folder")]),
        "missing column": (infer, raw_path, ["--pert_col", "drug"]),
        "control label absent": (infer, raw_path, ["--control_condition", "DMSO"]),
        "no control cells": (infer, _write(unused, tmp_path / "unused.h5ad"), []),
        "infer missing file": (infer, tmp_path / "absent.h5ad", []),
    }


def _argv(command, input_path, extra, output):
    argv = ["tx", command, "--adata", str(input_path)]
    if "--output" not in extra:
        argv += ["--output", str(output)]
    if command == "preprocess_train" and "--num_hvgs" not in extra:
        argv += ["--num_hvgs", "20"]
    if command == "preprocess_infer":
        if "--pert_col" not in extra:
            argv += ["--pert_col", "gene"]
        if "--control_condition" not in extra:
            argv += ["--control_condition", "non-targeting"]
    return argv + extra


def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, raw_path, capsys, fresh_logger):
    out_dir = tmp_path / "outputs"
    failures = []
    cases = _bad_inputs(tmp_path, raw_path)
    assert len(cases) >= 10
    for name, (command, input_path, extra) in cases.items():
        output = out_dir / f"{name.replace(' ', '_')}.h5ad"
        before = sorted(p.name for p in tmp_path.rglob("*"))
        rc = main(_argv(command, input_path, extra, output))
        err = capsys.readouterr().err.strip().splitlines()
        after = sorted(p.name for p in tmp_path.rglob("*"))
        if rc != 2 or len(err) != 1 or not err[0].startswith("error: ") or before != after:
            failures.append((name, rc, err, sorted(set(after) - set(before))))
    assert not failures, failures


def test_unwritable_output_folder(tmp_path, raw_path, capsys, fresh_logger):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions (the 'output under a file' case covers this path)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = main(["tx", "preprocess_train", "--adata", str(raw_path), "--output", str(locked / "o.h5ad"),
                   "--num_hvgs", "10"])
    finally:
        locked.chmod(0o700)
    assert rc == 2 and "not writable" in capsys.readouterr().err
    assert not list(locked.iterdir())


def test_cli_success_then_subprocess_error_is_one_line(tmp_path, raw_path, capsys, fresh_logger):
    assert main(["tx", "preprocess_train", "--adata", str(raw_path), "--output", str(tmp_path / "ok.h5ad"),
                 "--num_hvgs", "10"]) == 0
    with h5py.File(tmp_path / "ok.h5ad") as f:
        assert f["obsm/X_hvg"].shape[0] == 400
    # A real process: stderr must hold exactly the error line (no traceback, no warnings).
    result = subprocess.run(
        [sys.executable, "-m", "state", "tx", "preprocess_train", "--adata", str(tmp_path / "ok.h5ad"),
         "--output", str(tmp_path / "twice.h5ad"), "--num_hvgs", "10"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--input-is-log1p" in result.stderr and not (tmp_path / "twice.h5ad").exists()
