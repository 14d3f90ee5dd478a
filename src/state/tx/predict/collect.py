"""Accumulate ``predict_step`` outputs and turn them into arc-state's two AnnData files.

Per-cell mode keeps one row per predicted cell; pseudobulk mode keeps running sums per
(cell type, context, perturbation), so memory does not grow with the number of cells.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

CLIP_MAX = 14.0
_ARRAYS = ("preds", "real", "counts_pred", "counts_real")


def _numpy(value) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _strings(value, n: int) -> list[str] | None:
    if value is None:
        return None
    if hasattr(value, "detach"):  # one-hot or index tensor: keep the argmax as a label
        arr = value.detach().cpu().numpy()
        arr = arr.argmax(axis=1) if arr.ndim == 2 else arr
        return [str(v) for v in arr.tolist()]
    return [str(v) for v in list(value)][:n]


@dataclass
class PredictionCollector:
    pseudobulk: bool = False
    keep_perts: set[str] | None = None
    columns: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    arrays: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    sums: dict[tuple, dict] = field(default_factory=dict)
    n_cells: int = 0

    def add(self, batch: dict, out: dict) -> None:
        preds = _numpy(out["preds"])
        n = preds.shape[0]
        values = {
            "preds": preds,
            "real": _numpy(out.get("pert_cell_emb", batch.get("pert_cell_emb"))),
            "counts_pred": _numpy(out.get("pert_cell_counts_preds")),
            "counts_real": _numpy(out.get("pert_cell_counts", batch.get("pert_cell_counts"))),
        }
        meta = {
            "pert": _strings(batch.get("pert_name"), n),
            "cell_type": _strings(batch.get("cell_type"), n),
            "batch": _strings(batch.get("batch_name"), n) or _strings(batch.get("batch"), n),
            "dataset": _strings(batch.get("dataset_name"), n),
            "pert_cell_barcode": _strings(batch.get("pert_cell_barcode"), n),
            "ctrl_cell_barcode": _strings(batch.get("ctrl_cell_barcode"), n),
        }
        keep = np.ones(n, dtype=bool)
        if self.keep_perts is not None:
            keep = np.array([p in self.keep_perts for p in meta["pert"]])
            if not keep.any():
                return
        self.n_cells += int(keep.sum())
        if self.pseudobulk:
            self._add_sums(values, meta, keep)
            return
        self._store(values, keep)
        for key, col in meta.items():
            if col is not None:
                self.columns[key].extend(np.asarray(col, dtype=object)[keep].tolist())

    def _store(self, values: dict, keep: np.ndarray) -> None:
        for key, arr in values.items():
            if arr is not None:
                self.arrays[key].append(arr[keep])

    def _add_sums(self, values: dict, meta: dict, keep: np.ndarray) -> None:
        for i in np.flatnonzero(keep):
            ct = meta["cell_type"][i] if meta["cell_type"] else "all"
            context = f"{meta['dataset'][i]}.{ct}" if meta["dataset"] else ct
            key = (ct, context, meta["pert"][i])
            entry = self.sums.setdefault(key, {"n": 0})
            entry["n"] += 1
            for name, arr in values.items():
                if arr is not None:
                    entry[name] = entry.get(name, 0.0) + arr[i].astype(np.float64)

    def stacked(self) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
        """Matrices and the obs table (per cell, or per pseudobulk group)."""
        if self.pseudobulk:
            keys = sorted(self.sums)
            obs = pd.DataFrame({
                "cell_type": [k[0] for k in keys],
                "pseudobulk_context": [k[1] for k in keys],
                "pert": [k[2] for k in keys],
                "pseudobulk_n_cells": [self.sums[k]["n"] for k in keys],
            })
            mats = {
                name: np.stack([self.sums[k][name] / self.sums[k]["n"] for k in keys]).astype(np.float32)
                for name in _ARRAYS
                if keys and name in self.sums[keys[0]]
            }
            return mats, obs
        mats = {k: np.concatenate(v).astype(np.float32) for k, v in self.arrays.items() if v}
        return mats, pd.DataFrame({k: v for k, v in self.columns.items() if v})


def _obs_frame(obs: pd.DataFrame, *, pert_col: str, cell_type_key: str, batch_key: str) -> pd.DataFrame:
    rename = {"pert": pert_col, "cell_type": cell_type_key, "batch": batch_key}
    frame = pd.DataFrame(index=pd.Index([str(i) for i in range(len(obs))]))
    for col in obs.columns:
        if col == "dataset":
            continue
        target = rename.get(col, col)
        if col.startswith("pseudobulk") and target in rename.values():
            target = f"_{target}"
        frame[target] = pd.Categorical(obs[col].astype(str).to_numpy()) if obs[col].dtype == object else obs[col].to_numpy()
    return frame


def _var(width: int, gene_names) -> pd.DataFrame:
    if gene_names is not None and len(gene_names) == width:
        names = [str(g) for g in gene_names]
        if len(set(names)) == width:
            return pd.DataFrame({"gene_name": names}, index=pd.Index(names))
    return pd.DataFrame(index=pd.Index([f"feature_{i}" for i in range(width)]))


def build_anndatas(
    collector: PredictionCollector,
    *,
    pert_col: str,
    cell_type_key: str,
    batch_key: str,
    embed_key: str | None,
    output_space: str,
    gene_names=None,
) -> tuple[ad.AnnData, ad.AnnData]:
    """``adata_pred`` and ``adata_real`` in arc-state's layout, clipped to [0, 14]."""
    mats, obs = collector.stacked()
    obs_frame = _obs_frame(obs, pert_col=pert_col, cell_type_key=cell_type_key, batch_key=batch_key)
    store_raw = embed_key is not None and (
        (embed_key != "X_hvg" and output_space == "gene") or output_space == "all"
    )
    has_counts = "counts_pred" in mats and "counts_real" in mats
    out = []
    for x_name, emb_name in (("counts_pred", "preds"), ("counts_real", "real")):
        if store_raw and has_counts:
            x = mats[x_name]
            obsm = {embed_key: mats[emb_name]}
        else:
            x = mats[emb_name]
            obsm = {}
        x = np.clip(x, 0.0, CLIP_MAX, out=x)
        out.append(ad.AnnData(X=x, obs=obs_frame.copy(), var=_var(x.shape[1], gene_names), obsm=obsm))
    return out[0], out[1]
