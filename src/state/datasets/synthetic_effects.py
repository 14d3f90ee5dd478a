"""Perturb-seq data with known per-context true effects, for judging prediction quality.

Unlike :func:`state.datasets.synthetic.make_perturbation_adata` (one effect per perturbation, the
same in every cell type), the log-mean shift of perturbation ``p`` in context ``c`` here is::

    effect[c, p] = gain[c] * shared[p] + program[c] * (weights[c] . shared[p]) + knockdown[p]

* ``shared[p]``: a sparse mix of a few shared gene programs plus a handful of private genes;
* ``gain[c]``: a per-gene gain of the context (some genes respond more, some less, some not at all);
* ``program[c]``: a context-specific program, switched on in proportion to a fixed readout of the
  shared response (so it is learnable from the perturbations the context was trained on);
* ``knockdown[p]``: the target gene to ~10 % when the target is on the panel. A share of the
  perturbations are *null* (knockdown only) and a share target genes *off the panel* (named
  ``OFFxxxx``, no visible knockdown).

Counts are negative binomial as in the base generator. ``uns['true_effects']`` holds the truth:
``values`` [n_contexts * n_perts, n_genes] (natural-log mean shifts), with ``contexts`` and
``perturbations`` naming the rows, so a benchmark can correlate predicted changes with it.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.datasets.synthetic import CONTROL_LABEL, celltype_names, gene_symbols


def true_effects(rng, *, n_genes, n_perts, n_contexts, n_programs=6, null_fraction=0.1, off_panel_fraction=0.1):
    """(effects [C, P, G], target gene index per perturbation or -1 when off panel)."""
    programs = np.zeros((n_programs, n_genes))
    for k in range(n_programs):
        genes = rng.choice(n_genes, size=max(3, n_genes // 10), replace=False)
        programs[k, genes] = rng.choice([-1.0, 1.0], size=len(genes)) * rng.uniform(0.4, 1.0, len(genes))
    shared = np.zeros((n_perts, n_genes))
    for p in range(n_perts):
        active = rng.choice(n_programs, size=rng.integers(1, 3), replace=False)
        shared[p] = rng.uniform(0.5, 1.2, len(active)) @ programs[active]
        private = rng.choice(n_genes, size=max(2, n_genes // 40), replace=False)
        shared[p, private] += rng.choice([-1.0, 1.0], size=len(private)) * rng.uniform(0.5, 1.0, len(private))
    kinds = rng.permutation(n_perts)
    n_null, n_off = round(null_fraction * n_perts), round(off_panel_fraction * n_perts)
    shared[kinds[:n_null]] = 0.0
    gain = np.exp(rng.normal(0.0, 0.5, size=(n_contexts, n_genes)))
    gain[:, rng.choice(n_genes, size=n_genes // 10, replace=False)] = 0.0  # genes silent in every context
    program = np.zeros((n_contexts, n_genes))
    weights = rng.normal(0.0, 1.0 / np.sqrt(n_genes), size=(n_contexts, n_genes))
    for c in range(n_contexts):
        genes = rng.choice(n_genes, size=max(3, n_genes // 10), replace=False)
        program[c, genes] = rng.choice([-1.0, 1.0], size=len(genes)) * rng.uniform(0.5, 1.0, len(genes))
    effects = gain[:, None, :] * shared[None] + program[:, None, :] * (shared @ weights.T).T[:, :, None]
    targets = rng.choice(n_genes, size=n_perts, replace=False)
    targets[kinds[n_null:n_null + n_off]] = -1
    for p, t in enumerate(targets):
        if t >= 0:
            effects[:, p, t] = np.log(0.1)
    return effects, targets


def make_effects_adata(*, n_contexts=3, n_perts=60, n_genes=200, cells_per_group=30, control_cells=300,
                       counts_per_gene=4.0, dispersion=5.0, seed=0) -> ad.AnnData:
    """Raw counts (CSR float32) with obs gene / cell_type / gem_group and the truth in uns."""
    rng = np.random.default_rng(seed)
    genes = gene_symbols(n_genes)
    contexts = celltype_names(n_contexts)
    effects, targets = true_effects(rng, n_genes=n_genes, n_perts=n_perts, n_contexts=n_contexts)
    names = [genes[t] if t >= 0 else f"OFF{p:04d}" for p, t in enumerate(targets)]
    log_base = rng.normal(0.0, 1.0, size=n_genes)
    base = np.exp(log_base) / np.exp(log_base).sum()
    ctx_fx = rng.normal(0.0, 0.7, size=(n_contexts, n_genes))
    ctx_codes, pert_codes = [], []  # pert code 0 = control
    for c in range(n_contexts):
        ctx_codes.append(np.full(control_cells + n_perts * cells_per_group, c))
        pert_codes.append(np.concatenate([np.zeros(control_cells, int), np.repeat(np.arange(1, n_perts + 1),
                                                                                    cells_per_group)]))
    ctx_codes, pert_codes = np.concatenate(ctx_codes), np.concatenate(pert_codes)
    order = rng.permutation(len(ctx_codes))
    ctx_codes, pert_codes = ctx_codes[order], pert_codes[order]
    return counts_screen(rng, ctx_codes=ctx_codes, pert_codes=pert_codes, effects=effects, ctx_fx=ctx_fx,
                         base=base, names=names, contexts=contexts, genes=genes, counts_per_gene=counts_per_gene,
                         dispersion=dispersion, batch_sd=0.1, library_sd=0.3)


def counts_screen(rng, *, ctx_codes, pert_codes, effects, ctx_fx, base, names, contexts, genes, counts_per_gene,
                  dispersion, batch_sd, library_sd) -> ad.AnnData:
    """Negative-binomial counts of cells whose log mean is context + batch + perturbation effect, as an AnnData
    with the truth in ``uns['true_effects']``; shared by the screen generators (which differ in ``effects``)."""
    n_contexts, n_genes = len(contexts), len(genes)
    batch_codes = rng.integers(0, 2, size=len(ctx_codes))
    batch_fx = rng.normal(0.0, batch_sd, size=(2, n_genes))
    padded = np.concatenate([np.zeros((n_contexts, 1, n_genes)), effects], axis=1)
    log_mu = ctx_fx[ctx_codes] + batch_fx[batch_codes] + padded[ctx_codes, pert_codes]
    library = np.exp(rng.normal(np.log(counts_per_gene * n_genes), library_sd, size=len(ctx_codes)))
    mu = library[:, None] * base[None, :] * np.exp(log_mu)
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)
    obs = pd.DataFrame({
        "gene": pd.Categorical.from_codes(pert_codes, [CONTROL_LABEL, *names]),
        "cell_type": pd.Categorical.from_codes(ctx_codes, contexts),
        "gem_group": pd.Categorical.from_codes(batch_codes, ["batch1", "batch2"]),
    }, index=pd.Index([f"cell{i:06d}" for i in range(len(ctx_codes))]))
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame({"gene_name": genes}, index=genes))
    adata.uns["true_effects"] = {
        "values": effects.reshape(-1, n_genes).astype(np.float32),
        "contexts": np.repeat(contexts, len(names)).tolist(),
        "perturbations": names * n_contexts,
    }
    return adata


def truth_table(adata: ad.AnnData) -> pd.DataFrame:
    """True effects as a frame indexed by (context, perturbation), one column per gene."""
    truth = adata.uns["true_effects"]
    index = pd.MultiIndex.from_arrays([list(truth["contexts"]), list(truth["perturbations"])])
    return pd.DataFrame(np.asarray(truth["values"]), index=index, columns=adata.var_names)
