"""Edits ``state tx infer`` applies to the input before simulating, exactly as arc-state 0.11.1.

``--tsv`` (add control clones per requested perturbation), ``--celltypes`` (keep some cell
types), ``--all-perts`` (virtual copies of the controls per missing perturbation),
``--min-cells`` (pad small groups with control clones) and ``--max-cells`` (subsample big
groups). Order, random streams, group visiting order, obs names and what each step keeps of the
AnnData follow spec addendum part 1, so the edited input (and so the simulation) is bit for bit
arc-state's. Each step returns a new AnnData; the caller's object is never modified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.io.columns import InputColumns
from state.utils.errors import StateError

log = logging.getLogger(__name__)


def _labels(adata: ad.AnnData, pert_col: str) -> np.ndarray:
    return adata.obs[pert_col].astype(str).to_numpy()


def read_tsv_requests(path: str | Path) -> list[tuple[str, int]]:
    """Read a TSV with columns ``perturbation`` and ``num_cells``, in file order."""
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


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def pad_from_tsv(
    adata: ad.AnnData, requests: list[tuple[str, int]], *, pert_col: str, control: str, seed: int
) -> ad.AnnData:
    """For each (perturbation, n), in request order, append n control clones labelled with it.

    The result is rebuilt the way arc-state rebuilds it: X dense (dtype kept), categorical obs
    columns as plain objects, new rows named ``str(n_input + k)``, obsm rows stacked, var, varm
    and uns kept; layers, obsp, varp and raw do not survive.
    """
    controls = np.flatnonzero(_labels(adata, pert_col) == control)
    if controls.size == 0:
        raise StateError(f"--tsv needs control cells ('{control}') in obs['{pert_col}'] to clone, found none",
                         hint="pass --control-pert with the control label of your data")
    rng = np.random.RandomState(seed)
    picked, labels = [], []
    for pert, n in requests:
        if n <= 0:
            continue
        picked.append(rng.choice(controls, n, replace=True))
        labels.extend([pert] * n)
    if not picked:
        return adata
    rows = np.concatenate(picked)
    obs = adata.obs.copy()
    for column in obs.columns:
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            obs[column] = obs[column].astype(object)
    new_obs = obs.iloc[rows].copy()
    new_obs[pert_col] = labels
    new_obs.index = pd.Index([str(adata.n_obs + k) for k in range(rows.size)])
    x = _dense(adata.X)
    out = ad.AnnData(
        X=np.vstack([x, x[rows]]).astype(x.dtype, copy=False),
        obs=pd.concat([obs, new_obs]),
        var=adata.var.copy(),
        obsm={k: np.vstack([_dense(v), _dense(v)[rows]]) for k, v in adata.obsm.items()},
        varm={k: v.copy() for k, v in adata.varm.items()},
        uns=dict(adata.uns),
    )
    log.info("--tsv: padded AnnData %d -> %d cells", adata.n_obs, out.n_obs)
    return out


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


def _relabelled(adata: ad.AnnData, rows: np.ndarray, *, pert_col: str, pert: str, names: list[str]) -> ad.AnnData:
    """Copies of ``rows`` labelled ``pert`` and named ``names`` (a block to concatenate)."""
    obs = adata.obs.iloc[rows].copy()
    obs[pert_col] = pert
    obs.index = pd.Index(names)
    return ad.AnnData(X=adata.X[rows], obs=obs, var=adata.var, obsm={k: v[rows] for k, v in adata.obsm.items()},
                      layers={k: v[rows] for k, v in adata.layers.items()})


def _concat(adata: ad.AnnData, blocks: list[ad.AnnData]) -> ad.AnnData:
    """Originals first; an inner concat, as arc-state does (var columns, uns, varm, obsp are dropped)."""
    return ad.concat([adata, *blocks], axis=0, join="inner")


def add_all_perts(
    adata: ad.AnnData, known_perts: list[str], *, pert_col: str, control: str, seed: int,
    virtual_cells_per_pert: int | None,
) -> ad.AnnData:
    """One copy of the control template per model perturbation absent from the data, in map order."""
    labels = _labels(adata, pert_col)
    present = set(labels)
    missing = [p for p in known_perts if p not in present]
    if not missing:
        log.info("--all-perts: all perturbations already present")
        return adata
    template = np.flatnonzero(labels == control)
    if template.size == 0:
        raise StateError(f"--all-perts needs control cells ('{control}') in obs['{pert_col}'] as a template, "
                         "found none", hint="pass --control-pert with the control label of your data")
    if virtual_cells_per_pert is not None and template.size > virtual_cells_per_pert:
        template = template[np.random.RandomState(seed).choice(template.size, virtual_cells_per_pert, replace=False)]
    names = adata.obs_names.to_numpy()[template]
    blocks = [_relabelled(adata, template, pert_col=pert_col, pert=p, names=[f"{n}__virt_{p}" for n in names])
              for p in missing]
    log.info("--all-perts: added %d virtual perturbations x %d cells", len(missing), template.size)
    return _concat(adata, blocks)


def pad_min_cells(adata: ad.AnnData, min_cells: int, *, pert_col: str, control: str, seed: int) -> ad.AnnData:
    """Top every label (control included) up to ``min_cells`` with clones of the current controls.

    Labels are visited in pandas ``value_counts()`` order, called on the str column itself: its
    tie order is numpy's (unstable) sort, so only the same call reproduces arc-state's draws.
    """
    labels = _labels(adata, pert_col)
    pool = np.flatnonzero(labels == control)
    if pool.size == 0:
        raise StateError(f"--min-cells needs control cells ('{control}') in obs['{pert_col}'] to clone, found none",
                         hint="pass --control-pert with the control label of your data")
    rng = np.random.RandomState(seed)
    blocks = []
    for pert, count in pd.Series(labels).value_counts().items():
        deficit = int(min_cells - count)
        if deficit <= 0:
            continue
        rows = pool[rng.choice(pool.size, deficit, replace=True)]
        names = [f"{adata.obs_names[r]}__virt_{pert}__pad{j}" for j, r in enumerate(rows, start=1)]
        blocks.append(_relabelled(adata, rows, pert_col=pert_col, pert=str(pert), names=names))
    if not blocks:
        return adata
    log.info("--min-cells: added %d padding cells", sum(b.n_obs for b in blocks))
    return _concat(adata, blocks)


def cap_max_cells(adata: ad.AnnData, max_cells: int, *, pert_col: str, seed: int, **_) -> ad.AnnData:
    """Subsample every label (control included) above ``max_cells``; kept rows keep their order."""
    labels = _labels(adata, pert_col)
    rng = np.random.RandomState(seed + 1)
    keep = np.zeros(adata.n_obs, dtype=bool)
    for pert in np.unique(labels):
        rows = np.flatnonzero(labels == pert)
        keep[rng.choice(rows, max_cells, replace=False) if rows.size > max_cells else rows] = True
    if keep.all():
        return adata
    log.info("--max-cells: dropped %d cells", int((~keep).sum()))
    return adata[keep].copy()


def _str_labels(adata: ad.AnnData, pert_col: str) -> ad.AnnData:
    """The perturbation column as plain strings (NaN becomes 'nan'), as arc-state leaves it."""
    adata = adata.copy()
    adata.obs[pert_col] = adata.obs[pert_col].astype(str)
    return adata


@dataclass(frozen=True)
class InputEdits:
    """The edit options of ``state tx infer`` (None / False: that edit is skipped)."""

    tsv: str | Path | None = None
    celltypes: str | None = None
    all_perts: bool = False
    virtual_cells_per_pert: int | None = None
    min_cells: int | None = None
    max_cells: int | None = None

    def check(self) -> None:
        """Refuse impossible values before anything is read (arc-state only fails after editing)."""
        for flag, value in (("--min-cells", self.min_cells), ("--max-cells", self.max_cells),
                            ("--virtual-cells-per-pert", self.virtual_cells_per_pert)):
            if value is not None and value <= 0:
                raise StateError(f"{flag} {value} must be a positive integer", hint=f"pass {flag} 1 or more, or omit it")
        if self.min_cells is not None and self.max_cells is not None and self.max_cells < self.min_cells:
            raise StateError(f"--max-cells {self.max_cells} is smaller than --min-cells {self.min_cells}",
                             hint="pass a --max-cells at least as large as --min-cells")


def apply_edits(adata: ad.AnnData, edits: InputEdits, columns: InputColumns, *, pert_names: list[str],
                seed: int) -> ad.AnnData:
    """Apply the requested edits in arc-state's order: TSV, cell types, str cast, all perts, min, max."""
    edits.check()
    roles = {"pert_col": columns.pert_col, "control": columns.control, "seed": seed}
    if edits.tsv is not None:
        adata = pad_from_tsv(adata, read_tsv_requests(edits.tsv), **roles)
    if edits.celltypes:
        adata = keep_celltypes(adata, edits.celltypes, celltype_col=columns.celltype_col)
    if edits.all_perts or edits.min_cells is not None or edits.max_cells is not None:
        adata = _str_labels(adata, columns.pert_col)
    if edits.all_perts:
        adata = add_all_perts(adata, [str(p) for p in pert_names],
                              virtual_cells_per_pert=edits.virtual_cells_per_pert, **roles)
    if edits.min_cells is not None:
        adata = pad_min_cells(adata, edits.min_cells, **roles)
    if edits.max_cells is not None:
        adata = cap_max_cells(adata, edits.max_cells, **roles)
    return adata
