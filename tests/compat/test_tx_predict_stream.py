"""`state tx predict --stream-adatas` (arc-state main, PR #273): the streamed files equal the in-memory
ones, the writer keeps upstream's contract, and the flag rules are checked before anything loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from state.__main__ import main
from state.tx.predict.stream import StreamingH5adWriter

FIX = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx" / "state_llama"


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stream_run")
    shutil.copytree(FIX / "run", root / "run")
    toml = root / "split.toml"
    text = (FIX / "data" / "split_fewshot.toml").read_text()
    toml.write_text(text.replace("/data/state-fixtures/tx/state_llama/data/processed", str(FIX / "data" / "processed")))
    return root / "run", toml


def _predict(run: Path, toml: Path, *flags: str) -> int:
    return main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "final.ckpt", "--toml", str(toml),
                 *flags])


def test_streamed_files_equal_the_in_memory_ones(moved_run):
    run, toml = moved_run
    out = run / "eval_final.ckpt"
    assert _predict(run, toml, "--predict-only") == 0
    in_memory = [ad.read_h5ad(out / name) for name in ("adata_pred.h5ad", "adata_real.h5ad")]
    shutil.rmtree(out)
    assert _predict(run, toml, "--predict-only", "--stream-adatas") == 0
    streamed = [ad.read_h5ad(out / name) for name in ("adata_pred.h5ad", "adata_real.h5ad")]
    for got, expected in zip(streamed, in_memory, strict=True):
        assert got.X.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got.X, expected.X)
        assert got.obs.equals(expected.obs) and got.var.equals(expected.var)
        for adata in (got, expected):  # PR #246: the HVG names of the output columns
            assert list(adata.uns["X_hvg_var_names"]) == adata.var["gene_name"].tolist()
    assert sorted(p.name for p in out.iterdir()) == ["adata_pred.h5ad", "adata_real.h5ad"]  # no metrics


@pytest.mark.parametrize(("flags", "message"), [
    (["--stream-adatas"], "--stream-adatas requires --predict-only"),
    (["--stream-adatas", "--predict-only", "--skip-adatas"], "cannot be combined with --skip-adatas"),
])
def test_stream_flag_rules_are_one_line(moved_run, tmp_path, capsys, flags, message):
    assert main(["tx", "predict", "--output-dir", str(tmp_path / "nowhere"), *flags]) == 2  # checked first
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_stream_with_pseudobulk_runs_pseudobulk(moved_run, caplog):
    run, toml = moved_run
    assert _predict(run, toml, "--predict-only", "--pseudobulk", "--stream-adatas") == 0
    assert "--stream-adatas ignored" in caplog.text
    assert ad.read_h5ad(run / "eval_final.ckpt" / "adata_pred.h5ad").n_obs == 3


def _obs(n: int) -> pd.DataFrame:
    return pd.DataFrame({"gene": [f"p{i % 2}" for i in range(n)], "n": np.arange(n)})


def test_writer_blocks_equal_one_in_memory_write(tmp_path):
    rng = np.random.default_rng(0)
    x, emb = rng.normal(5, 8, size=(5, 3)).astype(np.float32), rng.normal(0, 20, size=(5, 2)).astype(np.float32)
    writer = StreamingH5adWriter(tmp_path / "s.h5ad", 5, 3, {"X_emb": 2})
    writer.write(x[:2], {"X_emb": emb[:2]})
    writer.write(x[2:], {"X_emb": emb[2:]})
    writer.close(_obs(5), pd.DataFrame(index=["0", "1", "2"]))
    got = ad.read_h5ad(tmp_path / "s.h5ad")
    np.testing.assert_array_equal(got.X, np.clip(x, 0, 14))
    np.testing.assert_array_equal(got.obsm["X_emb"], emb)  # obsm is not clipped
    assert got.obs["gene"].tolist() == _obs(5)["gene"].tolist() and list(got.obs_names) == list("01234")
    assert list(got.var_names) == ["0", "1", "2"]


def test_writer_shrinks_refuses_overflow_and_bad_obs(tmp_path):
    writer = StreamingH5adWriter(tmp_path / "part.h5ad", 5, 3)
    writer.write(np.ones((3, 3), np.float32))
    writer.close(_obs(3), pd.DataFrame(index=["0", "1", "2"]))
    assert ad.read_h5ad(tmp_path / "part.h5ad").n_obs == 3
    empty = StreamingH5adWriter(tmp_path / "empty.h5ad", 0, 4, {"X_emb": 2})
    empty.close(_obs(0), pd.DataFrame(index=["0", "1", "2", "3"]))
    got = ad.read_h5ad(tmp_path / "empty.h5ad")
    assert got.shape == (0, 4) and got.obsm["X_emb"].shape == (0, 2)
    full = StreamingH5adWriter(tmp_path / "over.h5ad", 2, 3)
    with pytest.raises(ValueError, match="overflow"):
        full.write(np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="obs has 1 rows"):
        full.close(_obs(1), pd.DataFrame(index=["0", "1", "2"]))
