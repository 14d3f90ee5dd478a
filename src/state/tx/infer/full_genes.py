"""``tx infer --full-genes``: the whole gene axis from a model that predicts a subset (e.g. 2,000 HVGs).

A submission scores every gene of a reference list (VCC 2026: 18,533, in a fixed order), but an
HVG model predicts only its genes. The rest of each simulated cell is taken from the control cell
that cell was simulated from (its basal cell): the model says the perturbation moves nothing it
does not model, and the control's values keep the cell's own unmodelled expression, noise
included. In each output row:

* genes the model predicts: the prediction (clipped to [0, 14], as every gene-space output);
* every other gene: the input's ``X`` value of that row's basal control cell (a row that could not
  be simulated keeps its own values);

in the order of the input's ``var`` or of a gene list file (one name per line, as the challenge
ships ``gene_names.csv``); a listed gene the input lacks is refused by name. ``X`` must hold log1p
values (the scale of the predictions); ``--output-counts`` then turns the whole axis into counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.tx.infer.simulate import CLIP_MAX, SimulationResult
from state.utils.errors import StateError

log = logging.getLogger(__name__)

GENE_FEATURE_KEYS = (None, "X_hvg")  # embed keys whose predictions are genes (the model's gene list)
_CHUNK_ROWS = 2048  # rows assembled densely at a time


@dataclass
class GeneAxis:
    """The output's genes and where each one's values come from."""

    names: list[str]  # output order
    source_file: str  # "the input's var" or the gene list file
    name_column: str | None  # where the input names its genes: None (var_names) or a var column


def _names_of(adata: ad.AnnData, column: str | None) -> pd.Index:
    return pd.Index((adata.var_names if column is None else adata.var[column]).astype(str))


def _name_column(adata: ad.AnnData, model_genes: list[str]) -> str | None:
    """var_names or var['gene_name'], whichever holds more of the model's genes (as infer aligns .X)."""
    if "gene_name" not in adata.var.columns:
        return None
    wanted = set(model_genes)
    by_column = len(wanted.intersection(_names_of(adata, "gene_name")))
    return "gene_name" if by_column > len(wanted.intersection(_names_of(adata, None))) else None


def plan_axis(adata: ad.AnnData, model_genes: list[str] | None, gene_list: str | Path | None, *,
              output_space: str, output: Path, source: str) -> GeneAxis:
    """Check the request against the input (before any work) and fix the output's gene order."""
    if output.suffix.lower() == ".npy":
        raise StateError("--full-genes writes an h5ad (the gene axis is its var)", hint="use an --output ending in .h5ad")
    if output_space not in ("gene", "all") or not model_genes:
        raise StateError(f"--full-genes needs a gene-space model with gene names (this one predicts in "
                         f"'{output_space}' space{'' if model_genes else ', without gene names'})",
                         hint="drop --full-genes")
    if adata.X is None:
        raise StateError(f"{source}: --full-genes takes the unmodelled genes from X, and X is missing",
                         hint="pass an input whose X holds every gene (log1p), e.g. preprocess_train's output")
    column = _name_column(adata, model_genes)
    names = _names_of(adata, column)
    if names.duplicated().any():
        raise StateError(f"{source}: duplicated gene names in var (e.g. {names[names.duplicated()][0]})",
                         hint="make gene names unique (adata.var_names_make_unique())")
    _check_log1p_scale(adata.X, source)
    if gene_list is None:
        axis = GeneAxis(list(names), "the input's var", column)
    else:
        from state.tx.vcc import read_gene_list

        path = Path(gene_list)
        if not path.is_file():
            raise StateError(f"--full-genes {path}: file not found", hint="pass the gene list file (one name per line)")
        listed = read_gene_list(path)
        missing = [g for g in listed if g not in set(names)]
        if missing:
            raise StateError(f"{len(missing)} gene(s) of {path} are not in {source}'s var: {', '.join(missing[:10])}"
                             + (", ..." if len(missing) > 10 else ""),
                             hint="the unmodelled genes come from the input's X: give an input with every listed gene")
        if len(set(listed)) != len(listed):
            raise StateError(f"{path} lists a gene twice", hint="remove the duplicate lines")
        axis = GeneAxis(listed, str(path), column)
    modelled = sum(1 for g in axis.names if g in set(model_genes))
    not_written = len(set(model_genes) - set(axis.names))
    log.info("--full-genes: %d genes in the order of %s; %d predicted by the model, %d from the control cells%s",
             len(axis.names), axis.source_file, modelled, len(axis.names) - modelled,
             f" ({not_written} modelled gene(s) not in that list are left out)" if not_written else "")
    return axis


def _check_log1p_scale(matrix, source: str) -> None:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    sample = np.asarray(values).ravel()[:1_000_000]
    top = float(sample.max()) if sample.size else 0.0
    if top > CLIP_MAX:
        raise StateError(f"{source}: X holds values up to {top:g}, not log1p values like the predictions "
                         "(raw counts?)",
                         hint="pass X as log1p(normalized) expression (preprocess_train's output); keep raw counts "
                         "in layers['counts'] for --output-counts")


def gene_prediction(result: SimulationResult, model_genes: list[str], model_embed_key: str | None) -> np.ndarray:
    """The prediction whose columns are the model's genes: the output itself for gene-feature models,
    else the decoded counts."""
    if model_embed_key in GENE_FEATURE_KEYS and result.preds.shape[1] == len(model_genes):
        return result.preds
    if result.counts is not None and result.counts.shape[1] == len(model_genes):
        return result.counts
    raise StateError(f"--full-genes: the prediction has no matrix with the model's {len(model_genes)} genes as columns",
                     hint="use a gene-space model (output_space gene or all), or drop --full-genes")


def full_gene_matrix(adata: ad.AnnData, axis: GeneAxis, prediction: np.ndarray, model_genes: list[str],
                     basal: np.ndarray) -> sp.csr_matrix:
    """[cells, axis genes] float32 CSR: predicted genes from ``prediction``, the rest from the basal cells."""
    source_cols = _names_of(adata, axis.name_column).get_indexer(axis.names)
    if (source_cols < 0).any():  # the edits keep var; a gene gone missing means the input changed under us
        raise StateError(f"--full-genes: gene {axis.names[int(np.argmax(source_cols < 0))]} is not in the input")
    model_index = {g: i for i, g in enumerate(model_genes)}
    model_cols = np.array([model_index.get(g, -1) for g in axis.names], dtype=np.int64)
    predicted = model_cols >= 0
    x = sp.csr_matrix(adata.X) if sp.issparse(adata.X) else np.asarray(adata.X)
    from_rows = np.where(basal >= 0, basal, np.arange(adata.n_obs))
    blocks = []
    for start in range(0, adata.n_obs, _CHUNK_ROWS):
        rows = from_rows[start : start + _CHUNK_ROWS]
        block = x[rows][:, source_cols]
        block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32)
        pred = np.asarray(prediction[start : start + _CHUNK_ROWS][:, model_cols[predicted]], dtype=np.float32)
        block[:, predicted] = np.clip(pred, 0.0, CLIP_MAX)
        blocks.append(sp.csr_matrix(block))
    if not blocks:
        return sp.csr_matrix((0, len(axis.names)), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def with_full_genes(adata: ad.AnnData, axis: GeneAxis, matrix: sp.csr_matrix) -> ad.AnnData:
    """The output AnnData: X over the axis genes, var of those genes; obs, obsm and uns kept, layers
    dropped (they hold the input cells' values, not the simulated ones)."""
    var = adata.var.iloc[_names_of(adata, axis.name_column).get_indexer(axis.names)].copy()
    var.index = pd.Index(axis.names)
    if adata.layers:
        log.info("--full-genes: layers %s dropped (they describe the input cells)", ", ".join(adata.layers))
    return ad.AnnData(X=matrix, obs=adata.obs.copy(), var=var, obsm=dict(adata.obsm), uns=dict(adata.uns))
