"""cell-eval scoring of ``predict`` outputs, a short printed summary, and plots.

Metrics come from cell-eval's ``MetricsEvaluator`` (one evaluation per cell type, as arc-state
does); we only add the summary table and two figures a user looks at first: predicted vs observed
change per perturbation, and the distribution of per-perturbation scores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from state.utils.errors import StateError

log = logging.getLogger(__name__)

SKIPPED_METRICS = ["pearson_edistance", "clustering_agreement"]


def _metric_configs(embed_key: str | None) -> dict:
    if embed_key and embed_key != "X_hvg":
        return {"discrimination_score": {"embed_key": embed_key}, "pearson_edistance": {"embed_key": embed_key, "n_jobs": -1}}
    return {}


def evaluate_and_plot(
    adata_pred: ad.AnnData,
    adata_real: ad.AnnData,
    *,
    outdir: Path,
    control_pert: str,
    pert_col: str,
    cell_type_key: str,
    embed_key: str | None,
    profile: str,
) -> dict[str, pd.DataFrame]:
    from cell_eval import MetricsEvaluator
    from cell_eval.utils import split_anndata_on_celltype

    from state.tx.data.module import usable_cpu_count

    preds = split_anndata_on_celltype(adata_pred, cell_type_key)
    reals = split_anndata_on_celltype(adata_real, cell_type_key)
    summaries: dict[str, pd.DataFrame] = {}
    for cell_type in sorted(preds):
        pred, real = preds[cell_type], reals[cell_type]
        labels = set(real.obs[pert_col].astype(str))
        if control_pert not in labels:
            raise StateError(
                f"cell type '{cell_type}' has no control cells ('{control_pert}') in the predicted split, "
                "so cell-eval cannot compute changes",
                hint="keep should_yield_control_cells=true (the default) or run with --predict-only",
            )
        if len(labels) < 2:
            log.warning("cell type %s has only control cells: skipped by the metrics", cell_type)
            continue
        evaluator = MetricsEvaluator(
            adata_pred=pred,
            adata_real=real,
            control_pert=control_pert,
            pert_col=pert_col,
            outdir=str(outdir),
            prefix=str(cell_type),
            pdex_kwargs={"exp_post_agg": True, "is_log1p": True},
            num_threads=usable_cpu_count(),
        )
        results, agg = evaluator.compute(
            profile=profile, metric_configs=_metric_configs(embed_key), skip_metrics=SKIPPED_METRICS
        )
        summaries[str(cell_type)] = agg.to_pandas()
        _plot_metric_distributions(results.to_pandas(), outdir / f"{cell_type}_metric_distributions.png")
    _plot_delta_scatter(adata_pred, adata_real, control_pert=control_pert, pert_col=pert_col,
                        path=outdir / "predicted_vs_observed_change.png")
    return summaries


def format_summary(summaries: dict[str, pd.DataFrame]) -> str:
    """One line per metric: mean over perturbations for each cell type."""
    if not summaries:
        return "no metrics computed"
    rows = {}
    for cell_type, agg in summaries.items():
        stat_col = agg.columns[0]
        mean_row = agg[agg[stat_col] == "mean"].drop(columns=[stat_col])
        if not mean_row.empty:
            rows[cell_type] = mean_row.iloc[0]
    table = pd.DataFrame(rows)
    return "mean metric per cell type\n" + table.to_string(float_format=lambda v: f"{v:.4f}")


def _mean_by_pert(adata: ad.AnnData, pert_col: str) -> pd.DataFrame:
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    frame = pd.DataFrame(x, columns=adata.var_names)
    frame["_pert"] = adata.obs[pert_col].astype(str).to_numpy()
    return frame.groupby("_pert").mean()


def _plot_delta_scatter(adata_pred, adata_real, *, control_pert: str, pert_col: str, path: Path) -> None:
    """Predicted vs observed change from control (log1p space), one panel per perturbation (up to 12)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred_means, real_means = _mean_by_pert(adata_pred, pert_col), _mean_by_pert(adata_real, pert_col)
    if control_pert not in real_means.index:
        return
    perts = [p for p in real_means.index if p != control_pert and p in pred_means.index][:12]
    if not perts:
        return
    cols = min(4, len(perts))
    rows = int(np.ceil(len(perts) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, pert in zip(axes.flat, perts, strict=False):
        observed = real_means.loc[pert] - real_means.loc[control_pert]
        predicted = pred_means.loc[pert] - pred_means.loc[control_pert] if control_pert in pred_means.index \
            else pred_means.loc[pert] - real_means.loc[control_pert]
        ax.scatter(observed, predicted, s=6, alpha=0.6)
        lim = float(np.nanmax(np.abs(np.concatenate([observed.to_numpy(), predicted.to_numpy()])))) or 1.0
        ax.plot([-lim, lim], [-lim, lim], lw=0.8, color="grey")
        r = np.corrcoef(observed, predicted)[0, 1] if observed.std() > 0 and predicted.std() > 0 else np.nan
        ax.set_title(f"{pert}  r={r:.2f}", fontsize=9)
        ax.set_xlabel("observed change", fontsize=8)
        ax.set_ylabel("predicted change", fontsize=8)
    for ax in list(axes.flat)[len(perts):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_metric_distributions(results: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = results.select_dtypes(include="number")
    numeric = numeric.loc[:, numeric.notna().any()]
    if numeric.empty:
        return
    cols = min(4, numeric.shape[1])
    rows = int(np.ceil(numeric.shape[1] / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, numeric.columns, strict=False):
        ax.hist(numeric[name].dropna(), bins=20)
        ax.set_title(name, fontsize=8)
    for ax in list(axes.flat)[numeric.shape[1]:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
