"""`state tx infer` input edits (--tsv, --all-perts, --min-cells, --max-cells) and the global control
fallback reproduce arc-state 0.11.1's outputs bit for bit (fixtures: tests/data/infer_edits)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from state.__main__ import main

DATA = Path(__file__).resolve().parents[1] / "data"
RUN = DATA / "fixtures" / "tx" / "state_llama" / "run"
EDITS = DATA / "infer_edits"


def _maker():
    spec = importlib.util.spec_from_file_location("make_infer_edits", EDITS / "make_infer_edits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()


def _run_case(tmp_path: Path, name: str, *flags: str) -> ad.AnnData:
    variant, extra = MAKER.CASES[name]
    source = tmp_path / f"{variant}.h5ad"
    MAKER.derive_input(variant).write_h5ad(source)
    tsv = tmp_path / "requests.tsv"
    tsv.write_text(MAKER.TSV_TEXT)
    out = tmp_path / "out.h5ad"
    argv = ["tx", "infer", "--model-dir", str(RUN), "--adata", str(source), "--pert-col", "gene",
            "--embed-key", "X_hvg", "--output", str(out), "--seed", "42", "--quiet", "--unknown-as-control",
            *flags, *[a.format(tsv=tsv) for a in extra]]
    assert main(argv) == 0
    return ad.read_h5ad(out)


@pytest.mark.parametrize("name", ["tsv_only", "combined", "min_max", "all_perts_min"])
def test_edits_match_arc_state_bit_for_bit(tmp_path, name):
    got = _run_case(tmp_path, name)
    expected = np.load(EDITS / f"{name}.npz")
    assert list(got.obs_names) == expected["obs_names"].tolist()
    for column in got.obs.columns:
        assert got.obs[column].astype(str).tolist() == expected[f"obs_{column}"].tolist(), column
    # the edited input is bit for bit arc-state's (names, labels, X); predictions match to float
    # rounding of the forward pass (a wrong basal draw would move them by ~0.1)
    np.testing.assert_allclose(got.obsm["X_hvg"], expected["X_hvg"], atol=1e-5, rtol=1e-5)
    x = got.X.toarray() if hasattr(got.X, "toarray") else np.asarray(got.X)
    assert list(x.shape) == expected["x_shape"].tolist()
    assert hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest() == str(expected["x_sha256"])
    assert sorted(got.uns.keys()) == expected["uns_keys"].tolist()
    assert sorted(got.layers.keys()) == expected["layers_keys"].tolist()
    assert sorted(got.obsm.keys()) == expected["obsm_keys"].tolist()


def test_global_control_fallback_matches_arc_state(tmp_path, capsys):
    with pytest.raises(AssertionError):
        _run_case(tmp_path, "global_fallback")  # refused by default ...
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ctA" in err[0] and "--global-control-fallback" in err[0]
    got = _run_case(tmp_path, "global_fallback", "--global-control-fallback")  # ... arc-state's result on request
    expected = np.load(EDITS / "global_fallback.npz")
    assert list(got.obs_names) == expected["obs_names"].tolist()
    np.testing.assert_allclose(got.obsm["X_hvg"], expected["X_hvg"], atol=1e-5, rtol=1e-5)


def _infer_argv(source: Path, out: Path, *flags: str) -> list[str]:
    return ["tx", "infer", "--model-dir", str(RUN), "--adata", str(source), "--pert-col", "gene",
            "--embed-key", "X_hvg", "--output", str(out), "--quiet", "--unknown-as-control", *flags]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-cells", "0"], "--min-cells 0 must be a positive integer"),
        (["--max-cells", "-1"], "--max-cells -1 must be a positive integer"),
        (["--all-perts", "--virtual-cells-per-pert", "0"], "--virtual-cells-per-pert 0 must be a positive"),
        (["--min-cells", "6", "--max-cells", "5"], "--max-cells 5 is smaller than --min-cells 6"),
    ],
)
def test_impossible_edit_values_are_one_line(tmp_path, capsys, flags, message):
    source = DATA / "fixtures" / "tx" / "state_llama" / "infer_input.h5ad"
    assert main(_infer_argv(source, tmp_path / "o.h5ad", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0] and "fix:" in err[0]
    assert not list(tmp_path.iterdir())


def test_nan_features_are_refused(tmp_path, capsys):
    adata = MAKER.derive_input("full")
    adata.obsm["X_hvg"][[3, 9], 0] = np.nan
    source = tmp_path / "nan.h5ad"
    adata.write_h5ad(source)
    before = source.read_bytes()
    assert main(_infer_argv(source, tmp_path / "o.h5ad")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "obsm['X_hvg'] holds NaN or infinite values in 2 cell(s)" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.h5ad"] and source.read_bytes() == before
