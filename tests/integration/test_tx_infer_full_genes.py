"""``tx infer --full-genes`` on an HVG-space model: modelled genes = the HVG prediction, every other gene
= the control cell each simulated cell started from, in the reference order; bad requests are one line."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from helpers.runs import TINY_STATE
from helpers.synthetic import make_processed_dataset, write_toml
from state.cli import run as cli_run
from state.tx import rundir
from state.tx.config.compose import compose_tx_config
from state.tx.infer import run as infer_run
from state.tx.infer import simulate as infer_simulate
from state.tx.train.run import train


@pytest.fixture(scope="module")
def hvg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_genes")
    data = make_processed_dataset(root / "data", n_cells=160, n_genes=30, n_hvgs=8, n_perts=3, seed=3)
    toml = write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")
    args = [f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene",
            "data.kwargs.num_workers=0", "data.kwargs.control_pert=non-targeting", "use_wandb=false",
            f"output_dir={root}", "name=hvg", "training.max_steps=2", "training.val_freq=2", "training.batch_size=2",
            *TINY_STATE]
    result = train(compose_tx_config(args))
    return {"run": result.run_dir, "data": data}


def _infer(hvg_run, out: Path, *more: str) -> int:
    return cli_run(["tx", "infer", "--model-dir", str(hvg_run["run"]), "--adata", str(hvg_run["data"]),
                    "--embed-key", "X_hvg", "--pert-col", "gene", "--output", str(out), *more])


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix)


def test_full_genes_are_the_prediction_plus_the_basal_control_cells(hvg_run, tmp_path, monkeypatch):
    basal = []

    def recording(windows, n_cells):  # the basal row of every output row, as infer used it
        basal.append(infer_simulate.basal_rows(windows, n_cells))
        return basal[-1]

    monkeypatch.setattr(infer_run, "basal_rows", recording)
    assert _infer(hvg_run, tmp_path / "hvg.h5ad") == 0
    assert _infer(hvg_run, tmp_path / "full.h5ad", "--full-genes") == 0
    hvg, full, source = (ad.read_h5ad(p) for p in (tmp_path / "hvg.h5ad", tmp_path / "full.h5ad", hvg_run["data"]))
    genes = rundir.read_genes(hvg_run["run"])
    assert list(full.var_names) == list(source.var_names)  # order = the input's var
    modelled = source.var_names.get_indexer(genes)
    others = np.setdiff1d(np.arange(source.n_vars), modelled)
    assert len(genes) >= 8 and others.size > 0
    x = _dense(full.X)
    np.testing.assert_array_equal(x[:, modelled], hvg.obsm["X_hvg"])  # = the HVG prediction (same seed)
    np.testing.assert_array_equal(full.obsm["X_hvg"], hvg.obsm["X_hvg"])
    rows = basal[-1]
    assert (rows >= 0).all()
    controls = source.obs["gene"].astype(str).to_numpy() == "non-targeting"
    assert controls[rows].all()  # every cell started from a control cell ...
    np.testing.assert_array_equal(x[:, others], _dense(source.X)[rows][:, others])  # ... whose other genes it keeps
    assert not np.array_equal(x[:, others], _dense(source.X)[:, others])  # not the cells' own values


def test_gene_list_order_counts_and_refusals(hvg_run, tmp_path, capsys):
    source = ad.read_h5ad(hvg_run["data"])
    listed = list(source.var_names[::-1][:20])
    (tmp_path / "genes.csv").write_text("".join(f"{g}\n" for g in listed))
    assert _infer(hvg_run, tmp_path / "listed.h5ad", "--full-genes", str(tmp_path / "genes.csv")) == 0
    listed_out = ad.read_h5ad(tmp_path / "listed.h5ad")
    full_out = tmp_path / "full.h5ad"
    assert _infer(hvg_run, full_out, "--full-genes") == 0
    assert list(listed_out.var_names) == listed
    np.testing.assert_array_equal(_dense(listed_out.X), _dense(ad.read_h5ad(full_out)[:, listed].X))

    counts = tmp_path / "counts.h5ad"
    assert _infer(hvg_run, counts, "--full-genes", "--output-counts") == 0
    counted = ad.read_h5ad(counts)
    assert counted.n_vars == source.n_vars and np.issubdtype(counted.X.dtype, np.integer)
    assert _dense(counted.X).sum(axis=1).min() > 0

    capsys.readouterr()
    (tmp_path / "bad.csv").write_text("GENE_NOPE\n" + listed[0] + "\nOTHER_NOPE\n")
    assert _infer(hvg_run, tmp_path / "no.h5ad", "--full-genes", str(tmp_path / "bad.csv")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 gene(s) of" in err[0] and "GENE_NOPE, OTHER_NOPE" in err[0]
    assert _infer(hvg_run, tmp_path / "no.npy", "--full-genes") == 2
    assert "--full-genes writes an h5ad" in capsys.readouterr().err
    assert not (tmp_path / "no.h5ad").exists() and not (tmp_path / "no.npy").exists()


def test_raw_counts_in_x_are_refused(hvg_run, tmp_path, capsys):
    source = ad.read_h5ad(hvg_run["data"])
    source.X = sp.csr_matrix(np.rint(np.expm1(_dense(source.X)) * 40))
    source.write_h5ad(tmp_path / "raw.h5ad")
    code = cli_run(["tx", "infer", "--model-dir", str(hvg_run["run"]), "--adata", str(tmp_path / "raw.h5ad"),
                    "--embed-key", "X_hvg", "--pert-col", "gene", "--output", str(tmp_path / "o.h5ad"), "--full-genes"])
    assert code == 2 and "not log1p values like the predictions" in capsys.readouterr().err
