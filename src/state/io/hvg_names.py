"""Gene names of the ``obsm['X_hvg']`` columns (arc-state PR #246, ``uns['X_hvg_var_names']``).

``preprocess_train`` stores them; predict and infer carry them so that downstream tools (pdex,
cell-eval) can name the columns of an HVG-space prediction. Older files lack the key: the reader
falls back to the ``highly_variable`` flags of var, with a warning.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

HVG_NAMES_KEY = "X_hvg_var_names"
HVG_OBSM_KEY = "X_hvg"
MISSING_WARNING = ("adata.uns['X_hvg_var_names'] not found. Downstream analysis (e.g., pdex) may not be able to map "
                   "predictions to gene names. Consider re-running preprocess_train with the latest STATE version.")


def as_names_array(names) -> np.ndarray:
    """Names as the object array of str the key holds (h5ad stores it as strings)."""
    return np.asarray([str(n) for n in names], dtype=object)


def hvg_names_format(adata, obsm_key: str = HVG_OBSM_KEY) -> str:
    """Where the names are found: ``current``, ``legacy_uns``, ``var_only`` or ``unknown``."""
    if f"{obsm_key}_var_names" in adata.uns:
        return "current"
    if HVG_NAMES_KEY in adata.uns:
        return "legacy_uns"
    if "highly_variable" in adata.var.columns:
        return "var_only"
    return "unknown"


def get_hvg_var_names(adata, obsm_key: str = HVG_OBSM_KEY) -> list[str] | None:
    """``uns['<obsm_key>_var_names']``, else ``uns['X_hvg_var_names']``, else var_names flagged
    highly_variable, else None."""
    found = hvg_names_format(adata, obsm_key)
    if found in ("legacy_uns", "var_only"):
        log.warning("Detected legacy HVG metadata for %s. Consider re-running preprocess_train with the latest "
                    "STATE version.", obsm_key)
    if found == "current":
        return [str(n) for n in adata.uns[f"{obsm_key}_var_names"]]
    if found == "legacy_uns":
        return [str(n) for n in adata.uns[HVG_NAMES_KEY]]
    if found == "var_only":
        flags = adata.var["highly_variable"].to_numpy().astype(bool)
        return [str(n) for n in adata.var_names[flags]]
    return None


def validate_hvg_var_names(adata, obsm_key: str = HVG_OBSM_KEY) -> bool:
    return get_hvg_var_names(adata, obsm_key) is not None
