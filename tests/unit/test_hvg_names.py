"""uns['X_hvg_var_names'] (arc-state PR #246): written by preprocess_train, read with fallbacks,
carried by infer (also through the concat of --min-cells) and written by predict."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from helpers.synthetic import make_perturbation_adata
from state.__main__ import main
from state.io.hvg_names import get_hvg_var_names, hvg_names_format, validate_hvg_var_names
from state.tx.preprocess import preprocess_train

FIX = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx" / "state_llama"


def test_preprocess_train_stores_the_hvg_names(tmp_path):
    raw = tmp_path / "raw.h5ad"
    make_perturbation_adata(seed=1).write_h5ad(raw)
    out = ad.read_h5ad(preprocess_train(raw, tmp_path / "p.h5ad", num_hvgs=20))
    names = out.uns["X_hvg_var_names"]
    assert isinstance(names, np.ndarray) and names.dtype == object and all(isinstance(n, str) for n in names)
    assert len(names) == out.obsm["X_hvg"].shape[1]
    assert list(names) == list(out.var_names[out.var["highly_variable"].to_numpy()])  # var order
    assert hvg_names_format(out) == "current"


def test_reader_fallbacks(caplog):
    a = ad.AnnData(np.zeros((2, 3), np.float32), var=pd.DataFrame({"highly_variable": [True, False, True]},
                                                                  index=["g0", "g1", "g2"]))
    with caplog.at_level(logging.WARNING):
        assert get_hvg_var_names(a) == ["g0", "g2"]
    assert "Detected legacy HVG metadata for X_hvg" in caplog.text
    a.uns["X_hvg_var_names"] = np.array(["a", "b"], dtype=object)
    assert get_hvg_var_names(a) == ["a", "b"]
    a.uns["X_hvg_var_names"] = np.array(["x", "y"], dtype=object)
    a.uns["X_pca_var_names"] = np.array(["p"], dtype=object)
    assert get_hvg_var_names(a, "X_pca") == ["p"] and hvg_names_format(a, "X_pca") == "current"
    plain = ad.AnnData(np.zeros((2, 3), np.float32))
    assert get_hvg_var_names(plain) is None and not validate_hvg_var_names(plain)



def _infer(tmp_path, source, *flags):
    out = tmp_path / "out.h5ad"
    assert main(["tx", "infer", "--model-dir", str(FIX / "run"), "--adata", str(source), "--pert-col", "gene",
                 "--embed-key", "X_hvg", "--output", str(out), "--unknown-as-control", *flags]) == 0
    return ad.read_h5ad(out)


def test_infer_carries_the_names_and_says_so(tmp_path, capsys, fresh_logger):
    adata = ad.read_h5ad(FIX / "infer_input.h5ad")
    names = adata.var_names[adata.var["highly_variable"].to_numpy()]
    adata.uns["X_hvg_var_names"] = np.asarray(names, dtype=object)
    source = tmp_path / "in.h5ad"
    adata.write_h5ad(source)
    got = _infer(tmp_path, source, "--verbose", "--min-cells", "30")  # the concat would drop uns
    err = capsys.readouterr().err
    assert list(got.uns["X_hvg_var_names"]) == list(names) and len(names) == got.obsm["X_hvg"].shape[1]
    assert f"HVG gene names found for X_hvg: {len(names)} entries." in err and "HVG names: present" in err


def test_infer_warns_when_the_names_are_missing(tmp_path, capsys, fresh_logger):
    adata = ad.read_h5ad(FIX / "infer_input.h5ad")
    del adata.var["highly_variable"]
    source = tmp_path / "in.h5ad"
    adata.write_h5ad(source)
    got = _infer(tmp_path, source, "--verbose")
    err = capsys.readouterr().err
    assert "adata.uns['X_hvg_var_names'] not found" in err and "HVG names: missing" in err
    assert "HVG gene names not found for X_hvg." in err and "X_hvg_var_names" not in got.uns
