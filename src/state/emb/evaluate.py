"""``state emb eval``: perturbation / differential-expression sanity check of an SE checkpoint.

Scores every (cell, gene) with the binary decoder, averages per perturbation, and compares the genes
that move most against control with scanpy's ``rank_genes_groups`` on the log1p data. Prints the
mean top-k overlap and per-perturbation ROC / PR AUC; writes no files. Runs on CPU (no CUDA calls).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from state.utils.errors import StateError

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    overlaps: dict[str, float]
    mean_overlap: float
    roc_auc: dict[str, float]
    pr_auc: dict[str, float]
    top_k: int


def _log_rows(x: np.ndarray) -> np.ndarray:
    """The SE tokenizer's per-row raw-count heuristic (state.emb.tokenize) on dense rows (clip, log1p when raw)."""
    x = np.nan_to_num(np.clip(x.astype(np.float32), 0, None))
    with np.errstate(over="ignore"):
        raw = (x.max(1) > 35) | (np.expm1(x.astype(np.float64)).sum(1) > 5_000_000)
    return np.where(raw[:, None], np.log1p(x), x)


def task_read_depth(xf: np.ndarray, *, positives: int, negatives: int, rng: np.random.Generator) -> np.ndarray:
    """Read depth as the collator gives it: mean of the non-zero targets over P positives (expressed
    genes) and N negatives (log value < 1), each drawn without replacement when there are enough."""
    depths = np.zeros(xf.shape[0], dtype=np.float32)
    for i, row in enumerate(xf):
        picks = []
        for pool, size in ((np.flatnonzero(row > 0), positives), (np.flatnonzero(row < 1), negatives)):
            if pool.size == 0:
                picks.append(np.zeros(size, dtype=np.int64))
            else:
                picks.append(rng.choice(pool, size=size, replace=pool.size <= size))
        y = row[np.concatenate(picks)]
        depths[i] = y[y != 0].mean() if (y != 0).any() else 0.0
    return depths


@torch.inference_mode()
def decoder_scores(loaded, adata, mapping, *, batch_size: int, seed: int) -> np.ndarray:
    """Binary-decoder score per (cell, mapped gene): float32 [cells, mapped genes]."""
    from state.emb.tokenize import SentenceBuilder, block_rng

    model, device = loaded.model, loaded.device
    builder = SentenceBuilder(mapping, pad_length=loaded.pad_length, cls_token_idx=loaded.cls_token_idx)
    gene_ids = torch.from_numpy(mapping.filtered_global_ids).to(device)
    gene_emb = model.gene_embeddings(gene_ids)  # [G, d]
    p = int(loaded.cfg.dataset.get("P", 512))
    n = int(loaded.cfg.dataset.get("N", 512))
    rng = np.random.default_rng(seed)
    out = np.empty((adata.n_obs, gene_ids.shape[0]), dtype=np.float32)
    for start in range(0, adata.n_obs, batch_size):
        rows = adata.X[start : start + batch_size]
        csr = sp.csr_matrix(rows)
        ids, counts = builder.build(csr, block_rng(seed, start))
        ids_t, counts_t = torch.from_numpy(ids).to(device), torch.from_numpy(counts).to(device)
        cell, ds = model.embed_cells(ids_t, counts_t.to(next(model.parameters()).dtype))
        xf = _log_rows(csr.toarray())[:, mapping.valid]
        depth = torch.from_numpy(task_read_depth(xf, positives=p, negatives=n, rng=rng)).to(device)
        scores = model.decode_genes(cell, gene_emb.to(cell.dtype), depth.to(cell.dtype), ds)
        out[start : start + rows.shape[0]] = scores.float().cpu().numpy()
    return out


def evaluate(
    adata_path,
    *,
    checkpoint,
    config=None,
    pert_col: str = "gene",
    control_pert: str = "non-targeting",
    gene_column: str = "gene_name",
    batch_size: int | None = None,
    protein_embeddings=None,
    seed: int = 0,
    device: str | None = None,
) -> EvalResult:
    import anndata
    import scanpy as sc
    from omegaconf import OmegaConf
    from sklearn.metrics import average_precision_score, roc_auc_score

    from state.emb.checkpoint import load_se_model
    from state.emb.tokenize import _overlap, map_genes
    from state.io.h5ad import open_h5ad

    open_h5ad(adata_path).close()  # one-line errors for missing / non-h5ad input
    adata = anndata.read_h5ad(adata_path)
    if pert_col not in adata.obs:
        raise StateError(f"{adata_path}: no obs column '{pert_col}'", hint="pass --pert-col")
    labels = adata.obs[pert_col].astype(str).to_numpy()
    if control_pert not in set(labels):
        raise StateError(f"{adata_path}: control '{control_pert}' not in obs['{pert_col}']", hint="pass --control-pert")
    loaded = load_se_model(checkpoint=checkpoint, config=config, protein_embeddings=protein_embeddings,
                           device=device or "cpu")
    index_hits = _overlap(adata.var_names, loaded.gene_to_index)
    mapping = map_genes(adata.var, loaded.gene_to_index, gene_column="index" if index_hits else gene_column,
                        where=str(adata_path))
    scores = decoder_scores(loaded, adata, mapping, batch_size=int(batch_size or loaded.default_batch_size),
                            seed=seed)
    gene_names = np.asarray(adata.var_names)[mapping.valid]
    top_k = int(OmegaConf.select(loaded.cfg, "validations.diff_exp.top_k_rank", default=200) or 200)
    method = OmegaConf.select(loaded.cfg, "validations.diff_exp.method", default=None)

    truth = adata.copy()
    truth.X = sp.csr_matrix(truth.X, dtype=np.float32) if sp.issparse(truth.X) else truth.X.astype(np.float32)
    sc.pp.log1p(truth)
    truth.obs[pert_col] = labels
    sc.tl.rank_genes_groups(truth, groupby=pert_col, reference=control_pert, rankby_abs=True, method=method,
                            use_raw=False, n_genes=truth.n_vars)
    ranked = truth.uns["rank_genes_groups"]
    control_mean = scores[labels == control_pert].mean(0)
    overlaps, roc, pr = {}, {}, {}
    for pert in sorted(set(labels) - {control_pert}):
        effect = np.abs(scores[labels == pert].mean(0) - control_mean)
        k = min(top_k, effect.size)
        predicted = set(gene_names[np.argsort(-effect)[:k]])
        names = np.asarray(ranked["names"][pert]).astype(str)
        overlaps[pert] = len(predicted & set(names[:k])) / k
        padj = dict(zip(names, np.asarray(ranked["pvals_adj"][pert]), strict=False))
        y = np.array([padj.get(g, 1.0) < 0.05 for g in gene_names])
        if 0 < y.sum() < y.size:
            roc[pert] = float(roc_auc_score(y, effect))
            pr[pert] = float(average_precision_score(y, effect))
    mean_overlap = float(np.mean(list(overlaps.values()))) if overlaps else float("nan")
    return EvalResult(overlaps=overlaps, mean_overlap=mean_overlap, roc_auc=roc, pr_auc=pr, top_k=top_k)
