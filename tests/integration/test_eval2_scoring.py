"""cell-eval2 scoring of predictions (``tx predict --scorer cell-eval2``) on small synthetic data.

Needs the ``eval2`` extra; about half a minute, most of it pdex's one-off numba compilation.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from state.tx.predict import eval2

pytest.importorskip("cell_eval2")


def _log1p_pair(n_per_pert=40, n_genes=40, n_perts=4, seed=0):
    """Real and predicted log1p data for one cell type (the prediction is a noisy copy), plus a control-only type."""
    labels = ["non-targeting"] + [f"g{i}" for i in range(n_perts)]

    def sample(offset):
        rows = []
        for j, _ in enumerate(labels):
            mu = np.full(n_genes, 6.0)
            if j:
                mu[3 * j:3 * j + 6] *= 4.0 if j % 2 else 0.15
            rows.append(np.random.default_rng(seed + offset + j).poisson(mu, size=(n_per_pert, n_genes)))
        counts = np.vstack(rows).astype(np.float64)
        x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
        adata = ad.AnnData(x)
        adata.obs["gene"] = np.repeat(labels, n_per_pert)
        adata.obs["cell_type"] = "K562"
        adata.var_names = [f"g{i}" for i in range(n_genes)]
        return adata

    real, pred = sample(0), sample(100)
    lonely = real[real.obs["gene"] == "non-targeting"][:5].copy()
    lonely.obs["cell_type"] = "HepG2"  # control cells only: skipped, as cell-eval skips it
    real = ad.concat([real, lonely])
    pred = ad.concat([pred, lonely])
    for a in (real, pred):
        a.obs_names_make_unique()
    return pred, real


def test_cell_eval2_writes_its_tables_and_scaled_scores(tmp_path):
    pred, real = _log1p_pair()
    (tmp_path / "cell_eval2").mkdir()
    (tmp_path / "cell_eval2" / "stale.csv").write_text("x")  # an earlier scoring is replaced whole
    scores = eval2.score_with_cell_eval2(pred, real, outdir=tmp_path, control_pert="non-targeting",
                                         pert_col="gene", cell_type_key="cell_type")
    assert list(scores) == ["K562"]
    folder = tmp_path / "cell_eval2" / "K562"
    for name in ("results.csv", "agg_results.csv", "run_meta.json", "evaluation_results.json", "anchor_meta.json",
                 "scores.csv", "baseline/baseline_agg.csv"):
        assert (folder / name).is_file(), name
    assert not (tmp_path / "cell_eval2" / "stale.csv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging folder removed

    table = scores["K562"].set_index("metric")
    scored = {"pds_cosine", "expr_mse_unbiased_capped_norm", "de_wilcoxon_sig_jaccard", "avg_score"}
    assert scored <= set(table.index)
    assert np.isfinite(table.loc["avg_score", "from_replicate"]) and np.isfinite(table.loc["pds_cosine", "value"])
    # a noisy copy of the truth sits well above the mean-response baseline
    assert table.loc["pds_cosine", "from_replicate"] > 0.5
    summary = pd.read_csv(tmp_path / eval2.SUMMARY_FILE)
    assert set(summary["cell_type"]) == {"K562"} and (summary["input_type"] == "lognorm").all()
    text = eval2.format_eval2_summary(scores)
    assert text.startswith("cell-eval2 (vcc2026)") and "avg_score" in text and "from_replicate" in text
    assert "K562 (log1p values" in text
