"""``predict --baselines``: does the model beat the free baselines on this run's own split?

Fits ``perturb_mean`` and ``linear`` (:mod:`state.tx.models.linear_baseline`, its ridge chosen per
context by cross-validation exactly as ``model=linear`` does by default) on the run's training
split (one pass over its training loader, no gradient steps), predicts every test cell as a control
cell of the same context (drawn from the observed test controls, per perturbation without
replacement, seeded by the run's ``training.train_seed``) plus the baseline's
pseudo-bulk response, scores each with the same cell-eval call as the model, and writes:

* ``<eval>/baseline_<name>/``: cell-eval's CSVs for that baseline;
* ``<eval>/baselines_comparison.csv``: metric by metric, model vs baselines (mean over contexts);
* ``<eval>/baselines_comparison.png``: the same as one bar chart per metric.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from state.io.atomic import atomic_write_text
from state.tx.models.linear_fit import fit_context_lines, format_choices
from state.tx.models.mean_response import MeanResponses

log = logging.getLogger(__name__)

BASELINES = ("perturb_mean", "linear")
FIGURE_METRICS = ("pearson_delta", "discrimination_score_l1", "pr_auc", "overlap_at_N", "mae", "mse")


def linear_lines(responses: MeanResponses) -> dict[str, np.ndarray]:
    """The ``linear`` baseline's lines with model=linear's default (CV'd) ridge; the choice is logged."""
    lines, choices = fit_context_lines(responses)
    log.info("%s", format_choices(choices, title="baseline linear: ridge per context (auto)"))
    return lines


def baseline_responses(responses: MeanResponses, contexts: list[str], perts: list[str], kind: str,
                       lines: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Predicted pseudo-bulk responses [N, D] of one baseline for each (context, perturbation)."""
    x = responses.elsewhere_rows(contexts, perts)
    if kind == "linear":
        lines = linear_lines(responses) if lines is None else lines
        for i, ctx in enumerate(contexts):
            if ctx in lines:
                x[i] = lines[ctx][0] + lines[ctx][1] * x[i]
    return x


def control_draws(controls: np.ndarray, perts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A control row for every row, per perturbation without replacement while the pool lasts.

    A trained model's cells are paired with the controls of its sets; drawing with replacement
    here instead would give a perturbation's pseudo-bulk a few repeated controls and more noise
    than the model it is compared with. Within a perturbation the pool is used in a random order
    (cycled when the perturbation has more cells than there are controls).
    """
    out = np.empty(len(perts), dtype=np.int64)
    for pert in np.unique(perts):
        rows = np.flatnonzero(perts == pert)
        order = rng.permutation(controls)
        out[rows] = order[np.arange(len(rows)) % len(order)]
    return out


def baseline_adata(adata_real: ad.AnnData, responses: MeanResponses, *, kind: str, control: str, pert_col: str,
                   cell_type_key: str, seed: int = 0) -> ad.AnnData:
    """The baseline's prediction in ``adata_real``'s layout: a same-context control cell + the response.

    Deterministic for a ``seed`` (predict passes the run's ``training.train_seed``)."""
    rng = np.random.default_rng([int(seed), 2718])
    real = np.asarray(adata_real.X.toarray() if hasattr(adata_real.X, "toarray") else adata_real.X, np.float32)
    perts = adata_real.obs[pert_col].astype(str).to_numpy()
    contexts = adata_real.obs[cell_type_key].astype(str).to_numpy()
    preds = real.copy()
    lines = linear_lines(responses) if kind == "linear" else None
    for ctx in np.unique(contexts):
        rows = np.flatnonzero((contexts == ctx) & (perts != control))
        controls = np.flatnonzero((contexts == ctx) & (perts == control))
        if not len(rows) or not len(controls):
            continue
        shift = baseline_responses(responses, [ctx] * len(rows), list(perts[rows]), kind, lines)
        preds[rows] = real[control_draws(controls, perts[rows], rng)] + shift
    if real.min() >= 0:  # expression (log1p) stays non-negative, as cell-eval requires
        np.clip(preds, 0.0, None, out=preds)
    return ad.AnnData(X=preds, obs=adata_real.obs.copy(), var=adata_real.var.copy())


def compare_with_baselines(data: Any, adata_pred: ad.AnnData, adata_real: ad.AnnData, model_metrics: dict, *,
                           eval_dir: Path, control: str, pert_col: str, cell_type_key: str,
                           embed_key: str | None, profile: str, seed: int = 0) -> pd.DataFrame | None:
    """Fit, predict and score the baselines; return the comparison table (None when not comparable)."""
    from state.tx.predict.evaluate import evaluate_and_plot

    responses = MeanResponses.from_datamodule(data, control)
    if responses.width != adata_real.n_vars:
        log.warning("baselines skipped: the training targets have %d features, the evaluated data %d",
                    responses.width, adata_real.n_vars)
        return None
    columns = {"model": _means(model_metrics)}
    for kind in BASELINES:
        pred = baseline_adata(adata_real, responses, kind=kind, control=control, pert_col=pert_col,
                              cell_type_key=cell_type_key, seed=seed)
        metrics = evaluate_and_plot(pred, adata_real, outdir=eval_dir / f"baseline_{kind}", control_pert=control,
                                    pert_col=pert_col, cell_type_key=cell_type_key, embed_key=embed_key,
                                    profile=profile)
        columns[kind] = _means(metrics)
    table = pd.DataFrame(columns)
    atomic_write_text(eval_dir / "baselines_comparison.csv", table.to_csv())
    _plot(table, eval_dir / "baselines_comparison.png")
    return table


def _means(metrics: dict) -> pd.Series:
    """Mean over contexts of each metric's per-context mean row."""
    rows = []
    for agg in metrics.values():
        agg = agg.to_pandas() if hasattr(agg, "to_pandas") else agg
        stat = agg.columns[0]
        mean = agg[agg[stat] == "mean"].drop(columns=[stat])
        if not mean.empty:
            rows.append(mean.iloc[0].astype(float))
    return pd.concat(rows, axis=1).mean(axis=1) if rows else pd.Series(dtype=float)


def format_comparison(table: pd.DataFrame) -> str:
    return "model vs free baselines (fit on this run's training split)\n" + table.to_string(
        float_format=lambda v: f"{v:.4f}")


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in FIGURE_METRICS if m in table.index]
    if not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = table.loc[metric]
        ax.bar(range(len(values)), values.to_numpy(), color=["C0", "C7", "C8"][: len(values)])
        ax.set_xticks(range(len(values)), values.index, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
