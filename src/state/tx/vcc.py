"""Virtual Cell Challenge submissions: check an ``infer`` output before ``cell-eval prep``.

``cell-eval prep -i pred.h5ad -g gene_names.csv`` packs a prediction for upload. It wants the
genes in the challenge's order, a ``target_gene`` column holding the control label too, at most
200,000 cells, and log1p-normalised expression. :func:`check_submission` applies the same rules
up front and reports every problem in one line, so a long inference run is not wasted on a file
the packer refuses.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.utils.errors import collect_errors

MAX_CELLS = 200_000
LOG1P_MAX = 20.0  # log1p of 4.8e8: beyond any normalised count


def read_gene_list(path: str | Path) -> list[str]:
    """Gene order file as the challenge ships it: one name per line, no header."""
    return pd.read_csv(path, header=None).iloc[:, 0].astype(str).tolist()


def check_submission(
    adata: ad.AnnData | str | Path,
    genes: list[str],
    *,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    max_cells: int = MAX_CELLS,
) -> None:
    """Raise one :class:`~state.utils.errors.StateError` listing every problem, or return."""
    if not isinstance(adata, ad.AnnData):
        adata = ad.read_h5ad(adata)
    problems: list[str] = []
    names = adata.var_names.astype(str).tolist()
    if names != list(genes):
        missing = len(set(genes) - set(names))
        extra = len(set(names) - set(genes))
        what = "in a different order" if not missing and not extra else f"{missing} missing, {extra} extra"
        problems.append(f"genes differ from the gene list ({what}); reorder with adata[:, genes]")
    if pert_col not in adata.obs.columns:
        problems.append(f"obs['{pert_col}'] is missing (pass --pert-col {pert_col} to infer)")
    elif control not in set(adata.obs[pert_col].astype(str)):
        problems.append(f"no control cells ('{control}') in obs['{pert_col}']")
    if adata.n_obs > max_cells:
        problems.append(f"{adata.n_obs} cells exceed the limit of {max_cells}")
    x = adata.X
    if x is None:
        problems.append("X is empty")
    else:
        if x.dtype != np.float32:
            problems.append(f"X is {x.dtype}, expected float32")
        values = x.data if sp.issparse(x) else np.asarray(x)
        if values.size:
            if not np.isfinite(values).all():
                problems.append("X has NaN or infinite values")
            elif values.min() < 0:
                problems.append("X has negative values")
            elif values.max() > LOG1P_MAX:
                problems.append(f"X max {values.max():.1f} looks like raw counts, expected log1p values")
            elif np.all(np.mod(values[: 100_000], 1) == 0) and values.max() > 1:
                problems.append("X holds only whole numbers: looks like raw counts, expected log1p values")
    collect_errors(problems, context="submission check")
