"""``state tx stats``: a first look at a perturbation screen before training on it.

From X as stored (log1p-normalized after ``preprocess_train``, raw counts before) it computes

* per gene: mean, max and fraction of cells with a non-zero value (plus the control mean);
* cells per perturbation (and per cell type);
* per perturbation (within each cell type when ``celltype_col`` is given): the difference between
  the perturbed cells' mean and the control cells' mean for every gene, the genes that change
  most, and, when the perturbation is named after a gene of var, how much that gene moved
  (a knockdown should rank its own target near the top with a negative delta).

Sparse X is never densified: column statistics walk row blocks, group means are one sparse
product. Tables go to CSV, figures to PNG (matplotlib, Agg backend), all written atomically.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.io import anndata_checks as checks
from state.io.atomic import atomic_path
from state.utils.errors import StateError

log = logging.getLogger(__name__)

ROW_BLOCK = 4096
HEATMAP_ROWS = 30
HEATMAP_GENES = 40
BAR_LIMIT = 60  # bar chart shows the largest and smallest perturbations beyond this many


@dataclass
class StatsResult:
    gene_stats: pd.DataFrame  # index gene: mean, max, nonzero_fraction, control_mean
    cell_counts: pd.DataFrame  # index perturbation: n_cells (+ one column per cell type)
    summary: pd.DataFrame  # one row per ([cell_type,] perturbation)
    deltas: pd.DataFrame  # same rows, one column per gene: mean(perturbed) - mean(control)
    top_genes: pd.DataFrame  # long table: [cell_type,] perturbation, rank, gene, delta, ...
    control_pert: str
    highly_variable: pd.Series | None = None  # var['highly_variable'] by gene, when present
    files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- numbers
def _row_blocks(n_rows: int):
    for start in range(0, n_rows, ROW_BLOCK):
        yield slice(start, min(start + ROW_BLOCK, n_rows))


def column_stats(X) -> pd.DataFrame:
    """Per-column mean, max and non-zero fraction of a CSR or dense matrix, one row block at a time."""
    n_rows, n_cols = X.shape
    sums = np.zeros(n_cols)
    nonzero = np.zeros(n_cols, dtype=np.int64)
    maxima = np.full(n_cols, -np.inf)
    for rows in _row_blocks(n_rows):
        block = X[rows]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            stored = block.data != 0
            sums += np.bincount(block.indices, weights=block.data, minlength=n_cols)
            nonzero += np.bincount(block.indices[stored], minlength=n_cols)
            maxima = np.maximum(maxima, block.max(axis=0).toarray().ravel())  # counts implicit zeros
        else:
            block = np.asarray(block)
            sums += block.sum(axis=0, dtype=np.float64)
            nonzero += np.count_nonzero(block, axis=0)
            maxima = np.maximum(maxima, block.max(axis=0))
    return pd.DataFrame({"mean": sums / max(n_rows, 1), "max": maxima, "nonzero_fraction": nonzero / max(n_rows, 1)})


def group_means(X, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """[n_groups, n_cols] mean of the rows of each group code (codes < 0 are ignored)."""
    rows = np.flatnonzero(codes >= 0)
    sizes = np.bincount(codes[rows], minlength=n_groups).astype(np.float64)
    weights = 1.0 / np.where(sizes > 0, sizes, 1.0)
    indicator = sp.csr_matrix((weights[codes[rows]], (codes[rows], rows)), shape=(n_groups, X.shape[0]))
    means = indicator @ X
    return np.asarray(means.toarray() if sp.issparse(means) else means, dtype=np.float64)


def _target_columns(adata, pert_names: np.ndarray) -> np.ndarray:
    """Column of var matching each perturbation name (var_names or var['gene_name']), else -1."""
    lookup: dict[str, int] = {}
    for names in (checks.gene_names(adata), adata.var_names.astype(str).to_numpy()):
        for i, name in enumerate(names):
            lookup.setdefault(str(name), i)
    return np.array([lookup.get(str(p), -1) for p in pert_names], dtype=np.int64)


def perturbation_stats(
    adata,
    *,
    pert_col: str,
    control_pert: str,
    celltype_col: str | None = None,
    top_n: int = 20,
    path: str | os.PathLike | None = None,
) -> StatsResult:
    """All tables of ``state tx stats`` for an in-memory AnnData (nothing is written)."""
    if top_n < 1:
        raise StateError(f"--top-n must be at least 1, got {top_n}")
    if adata.X is None:
        raise StateError(f"{path or 'the input'} has no X matrix", hint="store expression values in X")
    columns = [pert_col] + ([celltype_col] if celltype_col else [])
    checks.require_obs_columns(adata, columns, path=path,
                               hint="pass --pert-col (and --celltype-col) naming existing obs columns")
    is_control = checks.require_label_present(adata, pert_col, control_pert, path=path,
                                              hint="pass the control label of that column as --control-pert")
    X = checks.require_csr(adata.X, slot="X", path=path, allow_dense=True, convert=True)
    genes = checks.gene_names(adata)

    gene_stats = column_stats(X)
    gene_stats.index = pd.Index(genes, name="gene")
    gene_stats["control_mean"] = group_means(X, np.where(is_control, 0, -1), 1)[0]

    perts = adata.obs[pert_col].astype(str).to_numpy()
    cts = adata.obs[celltype_col].astype(str).to_numpy() if celltype_col else np.full(adata.n_obs, "all")
    cell_counts = _cell_counts(perts, cts if celltype_col else None, control_pert)

    pairs = pd.MultiIndex.from_arrays([cts, perts], names=["cell_type", "perturbation"])
    codes, keys = pairs.factorize(sort=True)
    keys = pd.MultiIndex.from_tuples(list(keys), names=["cell_type", "perturbation"])
    means = group_means(X, codes.astype(np.int64), len(keys))
    sizes = np.bincount(codes, minlength=len(keys))

    control_row = {ct: i for i, (ct, p) in enumerate(keys) if p == control_pert}
    perturbed = [i for i, (_, p) in enumerate(keys) if p != control_pert]
    no_control = sorted({keys[i][0] for i in perturbed if keys[i][0] not in control_row})
    if no_control:
        log.warning("cell type(s) without control cells are left out of the deltas: %s", ", ".join(no_control))
    perturbed = [i for i in perturbed if keys[i][0] in control_row]
    if not perturbed:
        raise StateError(f"no perturbed cells share a cell type with the control cells ('{control_pert}')",
                         hint="check --control-pert and --celltype-col")
    base = np.array([control_row[keys[i][0]] for i in perturbed], dtype=np.int64)
    delta = means[perturbed] - means[base]
    row_index = keys[perturbed] if celltype_col else pd.Index(keys[perturbed].get_level_values(1), name="perturbation")

    deltas = pd.DataFrame(delta.astype(np.float32), index=row_index, columns=pd.Index(genes, name="gene"))
    summary = _summary(delta, row_index, sizes[perturbed], sizes[base], genes,
                       _target_columns(adata, keys[perturbed].get_level_values(1).to_numpy()))
    top_genes = _top_genes(delta, means[perturbed], means[base], row_index, genes, top_n)
    hvg = None
    if "highly_variable" in adata.var.columns:
        hvg = pd.Series(adata.var["highly_variable"].fillna(False).astype(bool).to_numpy(), index=gene_stats.index)
    return StatsResult(gene_stats=gene_stats, cell_counts=cell_counts, summary=summary, deltas=deltas,
                       top_genes=top_genes, control_pert=str(control_pert), highly_variable=hvg)


def _cell_counts(perts: np.ndarray, cts: np.ndarray | None, control: str) -> pd.DataFrame:
    counts = pd.Series(perts).value_counts().rename("n_cells").to_frame()
    if cts is not None:
        per_ct = pd.crosstab(pd.Series(perts, name="perturbation"), pd.Series(cts, name="cell_type"))
        counts = counts.join(per_ct)
    counts.index.name = "perturbation"
    counts.insert(1, "is_control", counts.index == control)
    return counts.sort_values(["n_cells"], ascending=False, kind="stable")


def _summary(delta, index, n_cells, n_control, genes, target_cols) -> pd.DataFrame:
    magnitude = np.abs(delta)
    # rank 1 = the gene that moved most; ties share the better rank
    target_delta = np.where(target_cols >= 0, delta[np.arange(len(delta)), np.maximum(target_cols, 0)], np.nan)
    target_rank = np.array([
        1 + int((magnitude[i] > magnitude[i, c]).sum()) if c >= 0 else -1 for i, c in enumerate(target_cols)
    ])
    frame = pd.DataFrame({
        "n_cells": n_cells, "n_control_cells": n_control,
        "mean_abs_delta": magnitude.mean(axis=1), "max_abs_delta": magnitude.max(axis=1),
        "top_gene": np.asarray(genes)[magnitude.argmax(axis=1)],
        "target_gene_delta": target_delta, "target_gene_rank": pd.array(np.where(target_rank > 0, target_rank, None),
                                                                         dtype="Int64"),
    }, index=index)  # fmt: skip
    return frame.sort_values("mean_abs_delta", ascending=False, kind="stable")


def _top_genes(delta, pert_means, control_means, index, genes, top_n) -> pd.DataFrame:
    n = min(top_n, delta.shape[1])
    order = np.argsort(-np.abs(delta), axis=1, kind="stable")[:, :n]
    rows = np.repeat(np.arange(delta.shape[0]), n)
    cols = order.ravel()
    frame = index.to_frame(index=False).iloc[rows].reset_index(drop=True)
    frame["rank"] = np.tile(np.arange(1, n + 1), delta.shape[0])
    frame["gene"] = np.asarray(genes)[cols]
    frame["delta"] = delta[rows, cols]
    frame["control_mean"] = control_means[rows, cols]
    frame["perturbed_mean"] = pert_means[rows, cols]
    return frame


# ---------------------------------------------------------------------------------------------- figures
def _label(index_value) -> str:
    return " | ".join(map(str, index_value)) if isinstance(index_value, tuple) else str(index_value)


def plot_cell_counts(result: StatsResult, ax) -> None:
    counts = result.cell_counts.drop(columns=["is_control"])
    shown = counts
    title = f"Cells per perturbation ({len(counts)} labels, {int(counts['n_cells'].sum())} cells)"
    if len(counts) > BAR_LIMIT:
        half = BAR_LIMIT // 2
        shown = pd.concat([counts.iloc[:half], counts.iloc[-half:]])
        title += f": the {half} largest and {half} smallest"
        ax.axhline(half - 0.5, color="0.5", linestyle=":", linewidth=1)  # where the middle ones are left out
    per_ct = shown.drop(columns=["n_cells"])
    y = np.arange(len(shown))
    if per_ct.shape[1]:
        left = np.zeros(len(shown))
        for name in per_ct.columns:
            ax.barh(y, per_ct[name].to_numpy(), left=left, label=str(name))
            left += per_ct[name].to_numpy()
        ax.legend(title="cell type", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        colors = ["tab:gray" if p == result.control_pert else "tab:blue" for p in shown.index]
        ax.barh(y, shown["n_cells"].to_numpy(), color=colors)
    ax.axvline(float(counts["n_cells"].median()), color="black", linestyle="--", linewidth=0.8)
    labels = [f"{p} (control)" if p == result.control_pert else str(p) for p in shown.index]
    ax.set_yticks(y, labels, fontsize=max(5, min(9, 400 // max(len(shown), 1))))
    ax.invert_yaxis()
    ax.set_xlabel("cells (dashed line: median)")
    ax.set_title(title, fontsize=10)


def plot_delta_heatmap(result: StatsResult, ax, fig) -> None:
    rows = result.summary.index[:HEATMAP_ROWS]  # largest mean |delta| first
    block = result.deltas.loc[rows]
    genes = block.abs().max(axis=0).sort_values(ascending=False, kind="stable").index[:HEATMAP_GENES]
    values = block[genes].to_numpy()
    limit = float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(len(genes)), [str(g) for g in genes], rotation=90, fontsize=7)
    ax.set_yticks(np.arange(len(rows)), [_label(r) for r in rows], fontsize=8)
    ax.set_title(f"Largest changes vs control: {len(rows)} perturbations x {len(genes)} genes", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="mean(perturbed) - mean(control)")


def plot_gene_scatter(result: StatsResult, ax) -> None:
    stats = result.gene_stats
    expressed = stats[stats["mean"] > 0]
    hvg = result.highly_variable.reindex(expressed.index) if result.highly_variable is not None else None
    if hvg is not None and hvg.any():
        for mask, color, label in ((~hvg, "tab:gray", "other genes"), (hvg, "tab:red", "highly variable")):
            part = expressed[mask.to_numpy()]
            ax.scatter(part["mean"], part["nonzero_fraction"], s=8, alpha=0.6, color=color, linewidths=0, label=label)
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.scatter(expressed["mean"], expressed["nonzero_fraction"], s=8, alpha=0.6, color="tab:blue", linewidths=0)
    # the three most expressed genes, labels stacked below-left so they never overlap
    for k, (gene, row) in enumerate(expressed.nlargest(3, "mean").iterrows()):
        ax.annotate(str(gene), (row["mean"], row["nonzero_fraction"]), fontsize=7, xytext=(-60, -14 * (k + 1)),
                    textcoords="offset points", arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "0.4"})
    ax.set_xscale("log")
    ax.set_xlabel("mean expression over all cells (log scale)")
    ax.set_ylabel("fraction of cells with a non-zero value")
    ax.set_ylim(-0.02, 1.02)
    silent = len(stats) - len(expressed)
    ax.set_title(f"{len(stats)} genes" + (f" ({silent} never detected, not shown)" if silent else ""), fontsize=10)


def _save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def write_figures(result: StatsResult, output_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    n_bars = min(len(result.cell_counts), BAR_LIMIT)
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.2 * n_bars))
    plot_cell_counts(result, ax)
    written.append(_save_figure(fig, output_dir / "cells_per_perturbation.png"))
    plt.close(fig)

    n_rows = min(len(result.summary), HEATMAP_ROWS)
    fig, ax = plt.subplots(figsize=(3 + 0.22 * min(result.deltas.shape[1], HEATMAP_GENES), 2 + 0.25 * n_rows))
    plot_delta_heatmap(result, ax, fig)
    written.append(_save_figure(fig, output_dir / "top_delta_heatmap.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    plot_gene_scatter(result, ax)
    written.append(_save_figure(fig, output_dir / "gene_mean_vs_nonzero.png"))
    plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------- files
def _write_csv(frame: pd.DataFrame, path: Path, *, index: bool = True) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index, float_format="%.6g")
    return path


def write_stats(result: StatsResult, output_dir: str | os.PathLike) -> list[Path]:
    """Write the CSV tables and PNG figures into ``output_dir``; returns the files."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise StateError(f"--output-dir {out} is a file", hint="pass a folder path")
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _write_csv(result.gene_stats, out / "gene_stats.csv"),
        _write_csv(result.cell_counts, out / "cells_per_perturbation.csv"),
        _write_csv(result.summary, out / "perturbation_summary.csv"),
        _write_csv(result.deltas, out / "perturbation_deltas.csv"),
        _write_csv(result.top_genes, out / "top_genes.csv", index=False),
    ]
    files += write_figures(result, out)
    result.files = files
    return files


def run_stats(
    adata_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    pert_col: str,
    control_pert: str,
    celltype_col: str | None = None,
    top_n: int = 20,
) -> StatsResult:
    """Read ``adata_path``, compute every table (nothing is written on bad input), write them."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise StateError(f"--output-dir {out} is a file", hint="pass a folder path")
    adata = checks.read_h5ad_checked(adata_path)
    result = perturbation_stats(adata, pert_col=pert_col, control_pert=control_pert, celltype_col=celltype_col,
                                top_n=top_n, path=adata_path)
    write_stats(result, out)
    log.info("%d perturbations, %d genes: wrote %d files to %s", len(result.summary), len(result.gene_stats),
             len(result.files), out)
    return result
