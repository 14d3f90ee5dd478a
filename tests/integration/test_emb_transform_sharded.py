"""Sharded, resumable `state emb transform` on the se_tiny checkpoint: the outputs of 2 shards + --merge
and of --devices 2 equal the single-process ones bit for bit (h5ad, .npy, LanceDB); a kill -9 mid-run
loses only the unfinished units; bad inputs fail in one line before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from helpers.synthetic import make_perturbation_adata
from state.__main__ import main
from state.emb.sharded import transform_many
from state.emb.transform import transform
from state.emb.work_units import Shard, parse_shard, take
from state.utils.errors import StateError

SE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "emb" / "se_tiny"
MODEL = str(SE / "model")
ROOT = Path(__file__).resolve().parents[2]
SIZES = {"a": 2100, "b": 1030}  # 3 + 2 work units of 1024 rows


def _cells(n_cells: int, seed: int) -> ad.AnnData:
    adata = make_perturbation_adata(n_cells=n_cells, n_genes=160, seed=seed, counts_per_gene=6.0)
    adata.var_names = [f"SEG{i:03d}" for i in range(150)] + [f"NOPE{i}" for i in range(10)]
    return adata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two input files and the single-process reference outputs (h5ad, npy, one LanceDB with both)."""
    root = tmp_path_factory.mktemp("sharded")
    (root / "in").mkdir()
    for k, (stem, n) in enumerate(SIZES.items()):
        _cells(n, k).write_h5ad(root / "in" / f"{stem}.h5ad")
    for stem in SIZES:
        transform(root / "in" / f"{stem}.h5ad", output=root / "ref" / f"{stem}.h5ad", lancedb=root / "ref_db",
                  model_folder=MODEL, seed=5)
    return root


def _ref(data, stem) -> np.ndarray:
    return ad.read_h5ad(data / "ref" / f"{stem}.h5ad").obsm["X_state"]


def _table(db: Path):
    import lancedb

    return lancedb.connect(str(db)).open_table("state_embeddings").to_pandas()


def _done_units(work: Path) -> int:
    return len(list(work.glob("*/u*.json")))


def test_two_shards_then_merge_equal_single_process_for_h5ad_and_lancedb(data, tmp_path):
    inputs = [str(data / "in")]  # a folder
    common = dict(output=tmp_path / "out", lancedb=tmp_path / "db", model_folder=MODEL, seed=5, unit_rows=1024)
    first = transform_many(inputs, shard=Shard(0, 2), **common)
    assert first.computed_units == 3 and not (tmp_path / "out" / "a.h5ad").exists()  # shards do not merge
    with pytest.raises(StateError, match=r"1 of 3 work units of .*a\.h5ad are not done"):
        transform_many(inputs, merge=True, **common)
    assert not (tmp_path / "out" / "a.h5ad").exists() and not (tmp_path / "db").exists()
    assert transform_many(inputs, shard=Shard(1, 2), **common).computed_units == 2
    assert transform_many(inputs, merge=True, **common).computed_units == 0
    for stem in SIZES:
        merged = ad.read_h5ad(tmp_path / "out" / f"{stem}.h5ad")
        np.testing.assert_array_equal(merged.obsm["X_state"], _ref(data, stem))
        original = ad.read_h5ad(data / "in" / f"{stem}.h5ad")
        assert (merged.X != original.X).nnz == 0 and merged.obs.equals(original.obs)
    ours, ref = _table(tmp_path / "db"), _table(data / "ref_db")
    assert len(ours) == sum(SIZES.values())
    np.testing.assert_array_equal(np.stack(ours["vector"]), np.stack(ref["vector"]))
    assert ours.drop(columns="vector").equals(ref.drop(columns="vector"))
    # merging again appends nothing and recomputes nothing
    assert transform_many(inputs, merge=True, **common).computed_units == 0
    assert len(_table(tmp_path / "db")) == sum(SIZES.values())


def test_devices_2_on_cpu_equals_single_process_npy(data, tmp_path):
    """Two gloo processes through the CLI (glob input, .npy per file), merged by rank 0."""
    assert main(["emb", "transform", "--model-folder", MODEL, "--input", str(data / "in" / "*.h5ad"),
                 "--output", str(tmp_path / "out"), "--output-format", "npy", "--seed", "5",
                 "--devices", "2", "--unit-rows", "1024"]) == 0
    for stem in SIZES:
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{stem}.npy"), _ref(data, stem))


def test_kill_9_then_rerun_computes_only_the_missing_units(data, tmp_path):
    big = tmp_path / "big.h5ad"
    _cells(6 * 1024 - 5, 7).write_h5ad(big)  # 6 units
    out, work = tmp_path / "big_out.npy", tmp_path / "work"
    argv = ["emb", "transform", "--model-folder", MODEL, "--input", str(big), "--output", str(out), "--seed", "2",
            "--unit-rows", "1024", "--work-dir", str(work), "--shard", "0/1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "state", *argv], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while _done_units(work) < 1 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    done = _done_units(work)
    assert child.returncode == -signal.SIGKILL and 1 <= done < 6, (done, (tmp_path / "child.log").read_text()[-2000:])
    assert not out.exists()
    rerun = transform_many([str(big)], output=out, model_folder=MODEL, seed=2, unit_rows=1024, work_dir=work)
    assert rerun.computed_units == 6 - done  # finished units were not recomputed
    reference = tmp_path / "ref.npy"
    transform(big, output=reference, model_folder=MODEL, seed=2)
    np.testing.assert_array_equal(np.load(out), np.load(reference))
    assert not list(work.glob("*/*.npy")) and not list(work.glob("*/.u*"))  # unit arrays and kill leftovers go


def _fails(capsys, *argv, match: str) -> None:
    assert main(["emb", "transform", "--model-folder", MODEL, *argv]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[INFO]")]
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_bad_inputs_fail_in_one_line_before_any_work(data, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--output", str(out), "--unit-rows", "1024", "--seed", "5"]
    _fails(capsys, "--input", str(data / "in"), *base, "--shard", "3/2", match="--shard 3/2: the shard index")
    _fails(capsys, "--input", str(data / "in"), *base, "--shard", "x", match="is not of the form I/N")
    _fails(capsys, "--input", str(data / "in"), *base, "--unit-rows", "1000", match="not a positive multiple of 1024")
    _fails(capsys, "--input", str(data / "in" / "*.zarr"), *base, match="matches no file")
    _fails(capsys, "--input", str(data / "in"), "--output", str(tmp_path / "one.h5ad"), "--merge",
           match="is one file but 2 inputs")
    unmapped = _cells(30, 3)
    unmapped.var_names = [f"X{i}" for i in range(unmapped.n_vars)]
    unmapped.write_h5ad(tmp_path / "unmapped.h5ad")
    _fails(capsys, "--input", str(data / "in" / "a.h5ad"), "--input", str(tmp_path / "unmapped.h5ad"), *base,
           match=f"{tmp_path / 'unmapped.h5ad'}: no gene names")
    assert not out.exists() and not Path(str(out) + ".parts").exists()  # nothing written, not even the manifest

    # a work folder made with another seed / another model refuses the run
    _fails(capsys, "--input", str(data / "in"), *base, "--merge", match="no work units to merge")
    assert main(["emb", "transform", "--model-folder", MODEL, "--input", str(data / "in"), *base,
                 "--shard", "0/2"]) == 0
    _fails(capsys, "--input", str(data / "in"), "--output", str(out), "--unit-rows", "1024", "--seed", "6",
           "--shard", "1/2", match="was made with another --seed: seed 5 there, 6 now")
    genes = torch.load(SE / "model" / "protein_embeddings.pt")
    torch.save({k: v + 1 for k, v in genes.items()}, tmp_path / "other_genes.pt")
    _fails(capsys, "--input", str(data / "in"), *base, "--shard", "1/2", "--protein-embeddings",
           str(tmp_path / "other_genes.pt"), match="was made with another model")
    manifest = json.loads((Path(str(out) + ".parts") / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["unit_rows"] == 1024 and set(manifest["inputs"]) == set(SIZES)

    # a LanceDB table of another width
    from state.emb.vectordb import write_embeddings

    obs = ad.read_h5ad(data / "in" / "a.h5ad").obs
    write_embeddings(tmp_path / "db10", np.zeros((len(obs), 10), np.float32), obs, embed_key="X", dataset="old")
    _fails(capsys, "--input", str(data / "in"), "--lancedb", str(tmp_path / "db10"), "--seed", "5",
           match="stores vectors of width 10, this model gives 42")
    assert not Path(str(tmp_path / "db10") + ".parts").exists()
    other = _cells(40, 4)
    other.obs["extra"] = "x"
    other.write_h5ad(tmp_path / "other.h5ad")
    _fails(capsys, "--input", str(data / "in" / "a.h5ad"), "--input", str(tmp_path / "other.h5ad"), "--lancedb",
           str(tmp_path / "db2"), "--seed", "5", match="have different obs columns")
    assert not (tmp_path / "db2").exists()


def test_shard_parsing_and_round_robin_split():
    assert parse_shard("1/3") == Shard(1, 3) and parse_shard(None) is None
    units = list(range(10))
    shards = [take(units, Shard(i, 3)) for i in range(3)]
    assert sorted(u for s in shards for u in s) == units  # a partition
    assert take(units, Shard(1, 3), rank=1, world=2) == [4]  # 1, 4, 7 -> rank 1 of 2 gets 4
