"""The Virtual Cell Challenge path on a small scale: train, infer --tsv, check, `cell-eval prep`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from helpers.synthetic import make_processed_dataset, write_toml
from state.__main__ import main
from state.tx.vcc import check_submission, read_gene_list
from state.utils.errors import StateError


@pytest.fixture(scope="module")
def vcc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcc")
    data = make_processed_dataset(root, n_cells=360, n_genes=40, n_perts=5, n_celltypes=1, n_hvgs=20,
                                  pert_col="target_gene", batch_col="batch_var", seed=3)
    adata = ad.read_h5ad(data)
    perts = sorted(set(adata.obs["target_gene"].astype(str)) - {"non-targeting"})
    cell_line = adata.obs["cell_type"].astype(str).iloc[0]
    toml = write_toml(root / "split.toml", dataset_name="vcc", data_path=data, pert_col="target_gene",
                      fewshot={cell_line: {"val": perts[:1], "test": perts[1:3]}})
    overrides = [
        f"data.kwargs.toml_config_path={toml}", "data.kwargs.pert_col=target_gene",
        "data.kwargs.batch_col=batch_var", "data.kwargs.control_pert=non-targeting",
        "data.kwargs.embed_key=null", "data.kwargs.output_space=all", "data.kwargs.num_workers=0",
        "model=state_tiny", "training=debug", "training.max_steps=4", "training.val_freq=2",
        "use_wandb=false", f"output_dir={root}", "name=run",
    ]
    assert main(["tx", "train", *overrides]) == 0
    return root, adata, perts


def test_vcc_submission_from_control_template(vcc_run, tmp_path):
    root, adata, perts = vcc_run
    template = adata[adata.obs["target_gene"].astype(str) == "non-targeting"].copy()
    template_path = tmp_path / "controls.h5ad"
    template.write_h5ad(template_path)
    tsv = tmp_path / "pert_counts.tsv"
    tsv.write_text("perturbation\tnum_cells\n" + "".join(f"{p}\t{5 + i}\n" for i, p in enumerate(perts)))
    out = tmp_path / "prediction.h5ad"
    assert main(["tx", "infer", "--model-dir", str(root / "run"), "--adata", str(template_path),
                 "--pert-col", "target_gene", "--tsv", str(tsv), "--output", str(out), "--quiet"]) == 0
    pred = ad.read_h5ad(out)
    counts = pred.obs["target_gene"].astype(str).value_counts()
    assert all(counts[p] == 5 + i for i, p in enumerate(perts))
    assert counts["non-targeting"] == template.n_obs
    assert pred.X.dtype == np.float32 and 0 <= pred.X.min() and pred.X.max() <= 14

    genes_csv = tmp_path / "gene_names.csv"
    genes_csv.write_text("\n".join(adata.var_names) + "\n")
    genes = read_gene_list(genes_csv)
    check_submission(out, genes)  # raises on any problem
    with pytest.raises(StateError, match="different order"):
        check_submission(pred[:, ::-1].copy(), genes)
    raw = pred.copy()
    raw.X = np.round(np.expm1(raw.X) * 10).astype(np.float32)
    with pytest.raises(StateError, match="raw counts"):
        check_submission(raw, genes)

    cell_eval = Path(sys.executable).with_name("cell-eval")
    if shutil.which("zstd") is None or not cell_eval.exists():
        pytest.skip("cell-eval prep needs zstd and the cell-eval console script")
    vcc = tmp_path / "prediction.prep.vcc"
    subprocess.run([str(cell_eval), "prep", "-i", str(out), "-g", str(genes_csv), "-o", str(vcc),
                    "--expected-gene-dim", "-1"], check=True, capture_output=True)
    with tarfile.open(vcc) as tar:
        assert set(tar.getnames()) == {"pred.h5ad.zst", "watermark.txt"}


def _counts_template(adata):
    """Control cells with a raw-counts layer whose depths differ from cell to cell."""
    template = adata[adata.obs["target_gene"].astype(str) == "non-targeting"].copy()
    x = template.X.toarray() if hasattr(template.X, "toarray") else np.asarray(template.X)
    depth = np.random.default_rng(0).integers(2_000, 20_000, size=template.n_obs)
    expression = np.expm1(x.astype(np.float64))
    template.layers["counts"] = np.round(expression / expression.sum(1, keepdims=True) * depth[:, None])
    return template, template.layers["counts"].sum(1)


def test_vcc2026_counts_submission(vcc_run, tmp_path):
    root, adata, perts = vcc_run
    template, depths = _counts_template(adata)
    template_path = tmp_path / "controls.h5ad"
    template.write_h5ad(template_path)
    tsv = tmp_path / "pert_counts.tsv"
    tsv.write_text("perturbation\tnum_cells\n" + "".join(f"{p}\t8\n" for p in perts))
    outputs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        outputs.append(tmp_path / f"{name}.h5ad")
        assert main(["tx", "infer", "--model-dir", str(root / "run"), "--adata", str(template_path),
                     "--pert-col", "target_gene", "--tsv", str(tsv), "--output", str(outputs[-1]), "--quiet",
                     "--seed", str(seed), "--output-counts"]) == 0
    a, b, c = (ad.read_h5ad(p) for p in outputs)
    assert a.shape == (template.n_obs + 8 * len(perts), adata.n_vars)
    assert np.issubdtype(a.X.dtype, np.integer) and a.X.min() >= 0
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0  # fixed by --seed
    assert a.uns["state_counts"]["library_size_source"] == "layers['counts']"
    totals = np.asarray(a.X.sum(axis=1)).ravel()
    assert totals.min() >= 0.98 * depths.min() and totals.max() <= 1.02 * depths.max()

    config = pytest.importorskip("cell_eval2").EvalConfig.from_preset("vcc2026")
    from cell_eval2.norm import check_scale_limit, validate_input_type

    validate_input_type(a, config.input_type, allow_fractional=config.allow_fractional_counts)
    check_scale_limit(a, config.input_type, config.max_counts_per_cell)


def test_predict_scores_with_both_years_scorers(vcc_run, caplog):
    pytest.importorskip("cell_eval2")
    root, _, _ = vcc_run
    assert main(["tx", "predict", "--output-dir", str(root / "run"), "--checkpoint", "final.ckpt",
                 "--scorer", "both", "--preset", "vcc2026"]) == 0
    eval_dir = root / "run" / "eval_final.ckpt"
    assert list(eval_dir.glob("*_agg_results.csv"))  # cell-eval's tables
    scores = pd.read_csv(eval_dir / "cell_eval2_scores.csv")  # cell-eval2's, next to them
    assert {"pds_cosine", "expr_mse_unbiased_capped_norm", "de_wilcoxon_sig_jaccard"} <= set(scores["metric"])
    assert scores.set_index("metric")["value"].notna().any()
    for cell_type in scores["cell_type"].unique():
        assert (eval_dir / "cell_eval2" / cell_type / "agg_results.csv").is_file()
    # two test perturbations give cell-eval2 a degenerate mean-response baseline: raw metrics, and a warning
    assert scores["from_baseline"].isna().all() and "no scaled scores" in caplog.text
