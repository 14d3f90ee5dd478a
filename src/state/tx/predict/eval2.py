"""cell-eval2 scoring of ``predict`` outputs (``--scorer cell-eval2``, the 2026 challenge's scorer).

cell-eval2 reports each metric twice over: raw, and scaled so that 0 is the mean-response
baseline (every perturbation predicted as the average perturbation) and 1 a technical replicate
(half of the measured cells scored against the other half). We run its own command-line flow
per cell type, so the files are the ones its documentation describes:

* ``run``: per-perturbation ``results.csv``, ``agg_results.csv``, ``run_meta.json`` and
  ``evaluation_results.json``; then ``run --anchor`` on the real cells: the replicate anchor
  (``anchor_*``; when the data are too small for one, a warning, and only ``from_baseline``);
* ``baseline``: the mean-response baseline, in ``baseline/``;
* ``score``: ``scores.csv`` -- ``from_baseline`` and ``from_replicate`` per metric, and their
  ``avg_score``.

They land in ``<eval dir>/cell_eval2/<cell type>/``, and ``<eval dir>/cell_eval2_scores.csv``
gathers the scaled scores of every cell type. The folder is built aside and moved in whole, so a
failed scoring leaves the previous one untouched.

``predict`` compares log1p values (the model's output space), so the preset's input type is
switched to ``lognorm`` and the baseline uses cell-eval2's ``tile`` emitter (its only one for
lognorm input). The challenge itself scores integer counts (``tx infer --output-counts``); the
numbers here track it but are not the leaderboard's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.utils.errors import StateError

log = logging.getLogger(__name__)

SCORERS = ("cell-eval", "cell-eval2", "both")
DEFAULT_PRESET = "vcc2026"  # the 2026 challenge's preset, as cell-eval2's README names it
INSTALL_HINT = "pip install 'state[eval2]'"
FOLDER = "cell_eval2"
SUMMARY_FILE = "cell_eval2_scores.csv"


def require_cell_eval2(preset: str) -> None:
    """One-line error, before anything runs, when cell-eval2 is missing or the preset unknown."""
    try:
        from cell_eval2 import EvalConfig
    except ImportError:
        raise StateError("--scorer cell-eval2 needs the cell-eval2 package, which is not installed",
                         hint=INSTALL_HINT) from None
    try:
        EvalConfig.from_preset(preset)
    except ValueError as exc:  # its message lists the presets there are
        raise StateError(f"cell-eval2: {exc}", hint=f"use --preset {DEFAULT_PRESET}, the 2026 challenge's") from None


def _input_type(adata: ad.AnnData) -> str:
    """``counts`` for whole numbers (raw counts), else ``lognorm`` (predict's usual log1p values)."""
    x = adata.X
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    return "counts" if values.size and np.all(np.mod(values[:1_000_000], 1) == 0) else "lognorm"


def _run_cli(argv: list[str], *, what: str) -> None:
    """cell-eval2's own CLI entry point; its printed paths go to the debug log, its refusals to StateError."""
    from cell_eval2.cli import main

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            main(argv)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise StateError(f"cell-eval2 {argv[0]} failed for {what}: {exc.code}") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise StateError(f"cell-eval2 {argv[0]} failed for {what}: {exc}") from None
    log.debug("cell-eval2 %s: %s", argv[0], printed.getvalue().strip())


def _score_cell_type(pred: ad.AnnData, real: ad.AnnData, outdir: Path, *, preset: str, pert_col: str,
                     control_pert: str, what: str) -> pd.DataFrame:
    """cell-eval2's flow for one cell type; returns metric, value (mean), from_baseline, from_replicate."""
    input_type = _input_type(real)
    common = ["--preset", preset, "--pert-col", pert_col, "--control", control_pert, "--input-type", input_type]
    with tempfile.TemporaryDirectory(prefix="state-eval2-") as tmp:
        pred_path, real_path = Path(tmp) / "pred.h5ad", Path(tmp) / "real.h5ad"
        pred.write_h5ad(pred_path)
        real.write_h5ad(real_path)
        _run_cli(["run", "-ap", str(pred_path), "-ar", str(real_path), "-o", str(outdir), *common], what=what)
        try:
            scaled = _scaled_scores(real_path, outdir, common, counts=input_type == "counts", what=what)
        except StateError as exc:  # the raw metrics stand; say why there is no scale
            log.warning("%s; no scaled scores for %s", exc.message, what)
            scaled = pd.DataFrame(columns=["metric", "from_baseline"])
    means = pd.read_csv(outdir / "agg_results.csv").set_index("statistic").loc["mean"]
    raw = pd.DataFrame({"metric": means.index, "value": pd.to_numeric(means.to_numpy(), errors="coerce")})
    table = raw.merge(scaled, on="metric", how="outer")
    last = table["metric"] == "avg_score"  # the headline goes under the metrics it averages
    return pd.concat([table[~last], table[last]], ignore_index=True).assign(input_type=input_type)


def _scaled_scores(real_path: Path, outdir: Path, common: list[str], *, counts: bool, what: str) -> pd.DataFrame:
    """The mean-response baseline, the replicate anchor when the data allow one, and ``score``."""
    emit = ["--emit", "dispersed" if counts else "tile"]  # cell-eval2's only emitter for lognorm input is tile
    _run_cli(["baseline", "-ar", str(real_path), "-o", str(outdir / "baseline"), *emit, *common], what=what)
    anchor = ["--anchor", str(outdir)] if _replicate_anchor(real_path, outdir, common, what=what) else []
    _run_cli(["score", "--user-agg", str(outdir / "agg_results.csv"), "--baseline-agg",
              str(outdir / "baseline" / "baseline_agg.csv"), *anchor, "-o", str(outdir / "scores.csv")], what=what)
    columns = ["metric", "from_baseline"] + (["from_replicate"] if anchor else [])
    return pd.read_csv(outdir / "scores.csv")[columns]


def _replicate_anchor(real_path: Path, outdir: Path, common: list[str], *, what: str) -> bool:
    """The replicate end of the scale, from the real cells alone; False when the data cannot give one.

    Small test splits often cannot (too few genes respond in one half of the cells against the
    other), and cell-eval2 then refuses; the baseline-relative score still stands, so we keep it.
    """
    try:
        _run_cli(["run", "-ar", str(real_path), "-o", str(outdir), "--anchor", *common], what=what)
    except StateError as exc:
        log.warning("%s; scores are relative to the mean-response baseline only (from_baseline)", exc.message)
        return False
    return True


def _folder_name(cell_type: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", cell_type) or "_"


def score_with_cell_eval2(
    adata_pred: ad.AnnData,
    adata_real: ad.AnnData,
    *,
    outdir: Path,
    control_pert: str,
    pert_col: str,
    cell_type_key: str,
    preset: str = DEFAULT_PRESET,
) -> dict[str, pd.DataFrame]:
    """Score per cell type with cell-eval2.

    Returns cell type -> table of ``metric``, ``value`` (mean over perturbations), ``from_baseline``,
    ``from_replicate`` (NaN where cell-eval2 could not scale) and ``input_type``.
    """
    require_cell_eval2(preset)
    outdir = Path(outdir)
    staging = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=outdir))
    scores: dict[str, pd.DataFrame] = {}
    try:
        for cell_type in sorted(set(adata_real.obs[cell_type_key].astype(str))):
            real = adata_real[adata_real.obs[cell_type_key].astype(str) == cell_type].copy()
            pred = adata_pred[adata_pred.obs[cell_type_key].astype(str) == cell_type].copy()
            labels = set(real.obs[pert_col].astype(str))
            if control_pert not in labels or len(labels) < 2:
                log.warning("cell type %s lacks control cells or perturbations: skipped by cell-eval2", cell_type)
                continue
            folder = staging / FOLDER / _folder_name(cell_type)
            scores[cell_type] = _score_cell_type(pred, real, folder, preset=preset, pert_col=pert_col,
                                                 control_pert=control_pert, what=f"cell type {cell_type}")
        _summary_table(scores).to_csv(staging / SUMMARY_FILE, index=False)
        shutil.rmtree(outdir / FOLDER, ignore_errors=True)
        (staging / FOLDER).mkdir(exist_ok=True)
        (staging / FOLDER).rename(outdir / FOLDER)
        (staging / SUMMARY_FILE).replace(outdir / SUMMARY_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return scores


def _summary_table(scores: dict[str, pd.DataFrame]) -> pd.DataFrame:
    frames = [table.assign(cell_type=cell_type) for cell_type, table in scores.items()]
    columns = ["cell_type", "metric", "value", "from_baseline", "from_replicate", "input_type"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True).reindex(columns=columns)


def format_eval2_summary(scores: dict[str, pd.DataFrame], *, preset: str = DEFAULT_PRESET) -> str:
    """Per cell type: each metric's mean, and its scaled scores where cell-eval2 could scale it."""
    if not scores:
        return "cell-eval2: no metrics computed"
    lines = [f"cell-eval2 ({preset}): value = mean over perturbations; from_baseline / from_replicate = scaled "
             "(0 = mean-response baseline, 1 = perfect / technical replicate)"]
    for cell_type, table in scores.items():
        shown = table.set_index("metric").drop(columns="input_type", errors="ignore")
        note = " (log1p values, not the leaderboard's counts)" if (table["input_type"] == "lognorm").any() else ""
        lines.append(f"{cell_type}{note}")
        lines.append(shown.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-"))
    return "\n".join(lines)


__all__ = ["DEFAULT_PRESET", "SCORERS", "format_eval2_summary", "require_cell_eval2", "score_with_cell_eval2"]
