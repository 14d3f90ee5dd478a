"""The BENCHMARKS.md section of ``bench_quality.py``: tables, notes and the issue's targets.

Pure functions of the result rows (one dict per seed, task and model label), so a rescore of
existing run directories renders exactly as a fresh run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CELL_EVAL = ["pearson_delta", "discrimination_score_l1", "pr_auc", "mae"]
VCC_SHORT = {  # cell-eval2 vcc2026 scored metric -> column name in the tables
    "pds_cosine": "vcc_pds",
    "expr_mse_unbiased_capped_norm": "vcc_mse",
    "de_wilcoxon_sig_jaccard": "vcc_de_jaccard",
    "de_wilcoxon_lfc_nmae": "vcc_de_lfc",
    "de_wilcoxon_direction_fidelity_yield_raw": "vcc_dir_fidelity",
    "de_wilcoxon_direction_reach_raw": "vcc_dir_reach",
    "avg_score": "vcc_mean",
}
TARGET_TASK, TARGET_MODEL, BASE_MODEL = "fewshot", "state_plus", "perturb_mean"


def markdown(frame: pd.DataFrame) -> str:
    """A pipe table (index columns first), numbers with 3 decimals; no tabulate needed."""
    flat = frame.reset_index()
    head = "| " + " | ".join(map(str, flat.columns)) + " |"
    rule = "|" + "---|" * len(flat.columns)
    cells = [["-" if isinstance(v, float) and np.isnan(v) else f"{v + 0.0:.3f}" if isinstance(v, float) else str(v)
              for v in row] for row in flat.itertuples(index=False)]
    return "\n".join([head, rule, *("| " + " | ".join(c) + " |" for c in cells)])


def with_truth_scaled(table: pd.DataFrame) -> pd.DataFrame:
    """Adds ``truth_scaled``: 0 = perturb_mean, 1 = the observed cells (this benchmark's own scale)."""
    table = table.copy()
    base = table[table["model"] == BASE_MODEL].set_index(["task", "seed"])["truth_corr_model"]
    ref = np.array([base.get(k, np.nan) for k in zip(table["task"], table["seed"])])
    table["truth_scaled"] = (table["truth_corr_model"] - ref) / (table["truth_corr_observed"] - ref)
    return table


def columns(table: pd.DataFrame) -> list[str]:
    vcc = ["vcc_mean"] if "vcc_mean" in table else []
    return ["truth_corr_model", "truth_scaled", *[m for m in CELL_EVAL if m in table], *vcc, "truth_corr_observed"]


def vcc_section(rows: pd.DataFrame) -> list[str]:
    vcc = [c for c in VCC_SHORT.values() if c in rows]
    if not vcc:
        return []
    table = rows.groupby(["task", "model"], sort=True)[vcc].mean()
    return ["vcc2026 scaled scores per metric (means over seeds):", "", markdown(table), ""]


def per_seed_table(rows: pd.DataFrame) -> pd.DataFrame:
    values = {"truth_corr_model": "truth r", "discrimination_score_l1": "PDS l1", "pr_auc": "pr_auc",
              "vcc_mean": "vcc_mean"}
    values = {k: v for k, v in values.items() if k in rows}
    table = rows.pivot_table(index=["task", "model"], columns="seed", values=list(values), dropna=False)
    table = table.reindex(columns=[(m, s) for m in values for s in sorted(rows["seed"].unique())])
    table.columns = [f"{values[m]}, seed {s}" for m, s in table.columns]
    return table.dropna(how="all")


def target_lines(table: pd.DataFrame) -> list[str]:
    """The issue's targets on the few-shot task, per seed: met or missed, with the numbers."""
    rows = table[table["task"] == TARGET_TASK].set_index(["seed", "model"])
    lines = []
    for seed in sorted(table.loc[table["task"] == TARGET_TASK, "seed"].unique()):
        if (seed, TARGET_MODEL) not in rows.index or (seed, BASE_MODEL) not in rows.index:
            continue
        plus, base = rows.loc[(seed, TARGET_MODEL)], rows.loc[(seed, BASE_MODEL)]
        checks = [
            ("truth r >= perturb_mean + 0.05", plus["truth_corr_model"], base["truth_corr_model"] + 0.05, False),
            ("PDS l1 >= perturb_mean's", plus.get("discrimination_score_l1"), base.get("discrimination_score_l1"),
             False),
            ("pr_auc > perturb_mean's", plus.get("pr_auc"), base.get("pr_auc"), True),
            ("vcc2026 mean scaled score > 0", plus.get("vcc_mean", np.nan), 0.0, True),
        ]
        parts = []
        for name, value, bound, strict in checks:
            if value is None or bound is None or np.isnan(value) or np.isnan(bound):
                parts.append(f"{name}: not measured")
                continue
            met = value > bound if strict else value >= bound - 1e-12
            parts.append(f"{name}: {'met' if met else 'MISSED'} ({value:.3f} vs {bound:.3f})")
        lines.append(f"- seed {seed}: " + "; ".join(parts))
    return lines


def render(table: pd.DataFrame, *, command: str, main_models: list[str], row_notes: dict[str, str],
           notes: list[str], eval2_note: str) -> str:
    """Main tables (main models + reference rows, mean and per seed), targets, ablation (lowest seed)."""
    table = with_truth_scaled(table)
    cols = columns(table)
    shown = [m for m in main_models if m in set(table["model"])]
    shown += sorted(m for m in row_notes if m.startswith("state_") and m not in shown and m in set(table["model"]))
    main_rows = table[table["model"].isin(shown)]
    mean = main_rows.groupby(["task", "model"], sort=True)[cols].mean()
    first = min(table["seed"])
    ablation = table[table["seed"] == first].set_index(["task", "model"])[cols].sort_index()
    lines = ["## Prediction quality against known effects (`bench/bench_quality.py`)", "",
             f"Command: `{command}` (ablation rows: `--models state_plus --extra model.kwargs.<key>=<value> "
             "--label <row>`). `truth_corr_model`: Pearson (over HVGs) of the predicted change with the true "
             "log-mean shift, mean over test perturbations; `truth_corr_observed`: the same for the observed cells "
             "(the ceiling from data); `truth_scaled`: 0 = perturb_mean, 1 = observed. cell-eval columns: means "
             "over test perturbations (NaN-aware). " + eval2_note, "",
             "Means over seeds:", "", markdown(mean), "",
             *vcc_section(main_rows),
             "Per seed:", "", markdown(per_seed_table(main_rows)), "",
             "Targets of issue #15 (few-shot task, state_plus against perturb_mean):", "",
             *(target_lines(table) or ["- (few-shot rows of state_plus and perturb_mean not measured)"]), "",
             f"All rows of seed {first} (ablation):", "", markdown(ablation), "",
             *[f"- `{k}`: {v}" for k, v in row_notes.items() if k in set(table["model"])], "", *notes, ""]
    return "\n".join(lines)
