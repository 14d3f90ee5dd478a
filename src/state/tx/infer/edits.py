"""Edits ``state tx infer`` applies to the input before simulating, in arc-state's order.

``--tsv`` (add control clones per requested perturbation), ``--celltypes`` (keep some cell
types), ``--all-perts`` (one virtual copy of the controls per missing perturbation),
``--min-cells`` (pad small perturbations with control clones) and ``--max-cells`` (subsample big
ones). Each returns a new AnnData; the caller's object is never modified.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from state.io.columns import InputColumns
from state.utils.errors import StateError

log = logging.getLogger(__name__)


def _labels(adata: ad.AnnData, pert_col: str) -> np.ndarray:
    return adata.obs[pert_col].astype(str).to_numpy()


def _append_clones(
    adata: ad.AnnData, source_rows: np.ndarray, *, pert_col: str, labels: str | list[str], names: list[str]
) -> ad.AnnData:
    """Append copies of ``source_rows`` (X, obsm, obs) relabelled with ``labels``."""
    with warnings.catch_warnings():
        # repeated source rows give repeated names for a moment; they are replaced just below
        warnings.filterwarnings("ignore", message="Observation names are not unique")
        clones = adata[source_rows].copy()
    obs = clones.obs.copy()
    new_labels = [labels] * len(source_rows) if isinstance(labels, str) else list(labels)
    obs[pert_col] = pd.Categorical(new_labels)
    obs.index = pd.Index(names)
    clones.obs = obs
    merged = ad.concat([adata, clones], join="outer", merge="first", uns_merge="first")
    merged.obs[pert_col] = pd.Categorical(merged.obs[pert_col].astype(str))
    merged.var = adata.var.copy()
    merged.uns = adata.uns
    return merged


def read_tsv_requests(path: str | Path) -> list[tuple[str, int]]:
    """Read a TSV with columns ``perturbation`` and ``num_cells``."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"--tsv file not found: {path}", hint="pass a TSV with columns perturbation and num_cells")
    table = pd.read_csv(path, sep="\t")
    missing = [c for c in ("perturbation", "num_cells") if c not in table.columns]
    if missing:
        raise StateError(
            f"--tsv {path} lacks column(s) {', '.join(missing)} (found: {', '.join(map(str, table.columns))})",
            hint="the file must be tab-separated with a header line: perturbation<TAB>num_cells",
        )
    counts = pd.to_numeric(table["num_cells"], errors="coerce")
    bad = table.loc[counts.isna() | (counts < 0), "perturbation"].astype(str).tolist()
    if bad:
        raise StateError(f"--tsv {path}: num_cells is not a non-negative integer for {', '.join(bad[:5])}")
    return list(zip(table["perturbation"].astype(str), counts.astype(int), strict=True))


def pad_from_tsv(
    adata: ad.AnnData, requests: list[tuple[str, int]], *, pert_col: str, control: str, seed: int
) -> ad.AnnData:
    """For each (perturbation, n) append n control clones labelled with that perturbation."""
    controls = np.flatnonzero(_labels(adata, pert_col) == control)
    if controls.size == 0:
        raise StateError(f"--tsv needs control cells ('{control}' in obs['{pert_col}']) to clone, found none",
                         hint="pass --control-pert with the control label of your data")
    rng = np.random.RandomState(seed)
    picked, labels = [], []
    for pert, n in requests:
        if n <= 0:
            continue
        picked.append(rng.choice(controls, size=n, replace=True))
        labels.extend([pert] * n)
    if not picked:
        return adata
    rows = np.concatenate(picked)
    names = [str(adata.n_obs + i) for i in range(rows.size)]
    merged = _append_clones(adata, rows, pert_col=pert_col, labels=labels, names=names)
    log.info("--tsv: appended %d control-cloned cells for %d perturbations", rows.size, len(requests))
    return merged


def keep_celltypes(adata: ad.AnnData, celltypes: str, *, celltype_col: str | None) -> ad.AnnData:
    wanted = [c.strip() for c in celltypes.split(",") if c.strip()]
    if celltype_col is None:
        raise StateError("--celltypes needs a cell-type column, none was found", hint="pass --celltype-col")
    present = set(adata.obs[celltype_col].astype(str))
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise StateError(
            f"--celltypes names {', '.join(unknown)}, absent from obs['{celltype_col}'] "
            f"(present: {', '.join(sorted(present)[:10])})"
        )
    mask = adata.obs[celltype_col].astype(str).isin(wanted).to_numpy()
    return adata[mask].copy()


def add_all_perts(
    adata: ad.AnnData, known_perts: list[str], *, pert_col: str, control: str, seed: int,
    virtual_cells_per_pert: int | None,
) -> ad.AnnData:
    """Clone the control cells once per known perturbation that the data does not contain."""
    labels = _labels(adata, pert_col)
    controls = np.flatnonzero(labels == control)
    if controls.size == 0:
        raise StateError(f"--all-perts needs control cells ('{control}' in obs['{pert_col}']), found none",
                         hint="pass --control-pert with the control label of your data")
    present = set(labels)
    missing = [p for p in known_perts if p not in present and p != control]
    if not missing:
        return adata
    rng = np.random.RandomState(seed)
    if virtual_cells_per_pert is not None and virtual_cells_per_pert < controls.size:
        template = rng.choice(controls, size=virtual_cells_per_pert, replace=False)
    else:
        template = controls
    names_src = adata.obs_names.to_numpy()[template]
    for pert in missing:
        adata = _append_clones(adata, template, pert_col=pert_col, labels=pert,
                               names=[f"{n}__virt_{pert}" for n in names_src])
    log.info("--all-perts: added %d virtual perturbations x %d cells", len(missing), template.size)
    return adata


def pad_min_cells(adata: ad.AnnData, min_cells: int, *, pert_col: str, control: str, seed: int) -> ad.AnnData:
    labels = _labels(adata, pert_col)
    controls = np.flatnonzero(labels == control)
    if controls.size == 0:
        return adata
    rng = np.random.RandomState(seed)
    perts, counts = np.unique(labels, return_counts=True)
    for pert, count in zip(perts, counts, strict=True):
        if pert == control or count >= min_cells:
            continue
        extra = rng.choice(controls, size=min_cells - count, replace=True)
        names = [f"{adata.obs_names[r]}__virt_{pert}__pad{k}" for k, r in enumerate(extra)]
        adata = _append_clones(adata, extra, pert_col=pert_col, labels=str(pert), names=names)
    return adata


def cap_max_cells(adata: ad.AnnData, max_cells: int, *, pert_col: str, control: str, seed: int) -> ad.AnnData:
    labels = _labels(adata, pert_col)
    rng = np.random.RandomState(seed + 1)
    keep = np.ones(adata.n_obs, dtype=bool)
    for pert in np.unique(labels):
        if pert == control:
            continue
        rows = np.flatnonzero(labels == pert)
        if rows.size > max_cells:
            drop = np.setdiff1d(rows, rng.choice(rows, size=max_cells, replace=False))
            keep[drop] = False
    return adata if keep.all() else adata[keep].copy()


@dataclass(frozen=True)
class InputEdits:
    """The edit options of ``state tx infer`` (None / False: that edit is skipped)."""

    tsv: str | Path | None = None
    celltypes: str | None = None
    all_perts: bool = False
    virtual_cells_per_pert: int | None = None
    min_cells: int | None = None
    max_cells: int | None = None


def apply_edits(adata: ad.AnnData, edits: InputEdits, columns: InputColumns, *, pert_names: list[str],
                seed: int) -> ad.AnnData:
    """Apply the requested edits in arc-state's order: TSV, cell types, all perts, min, max."""
    roles = {"pert_col": columns.pert_col, "control": columns.control, "seed": seed}
    if edits.tsv is not None:
        adata = pad_from_tsv(adata, read_tsv_requests(edits.tsv), **roles)
    if edits.celltypes:
        adata = keep_celltypes(adata, edits.celltypes, celltype_col=columns.celltype_col)
    if edits.all_perts:
        adata = add_all_perts(adata, pert_names, virtual_cells_per_pert=edits.virtual_cells_per_pert, **roles)
    if edits.min_cells is not None:
        adata = pad_min_cells(adata, edits.min_cells, **roles)
    if edits.max_cells is not None:
        adata = cap_max_cells(adata, edits.max_cells, **roles)
    return adata
