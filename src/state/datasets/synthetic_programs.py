"""An independent Perturb-seq generator built on latent gene programs, for judging models on data
they were not designed around.

:mod:`state.datasets.synthetic_effects` (the quality bench's first generator) gives each context a
per-*gene* gain and a context program switched on by a readout of the shared response. This one is
built differently, the way the issue that asked for it describes real screens:

* ``n_programs`` latent gene programs (sparse loadings over the genes: a ribosome, a stress, a
  cell-cycle module ...); a perturbation switches one or two of them up or down;
* the shared effect of perturbation ``p`` (programs x loadings) is scaled in context ``c`` by one
  **scalar gain** per context (a cell line that responds more or less strongly overall);
* plus a **context-specific part** of strength ``specific_scale``: each context has its own private
  programs, driven by a context-specific mixing of the perturbation's program activations, so what a
  perturbation does there is only partly predictable from what it does elsewhere;
* a CRISPRi **knockdown** of the target gene (to ``knockdown`` of its level) when the target is on the
  panel; a share of **null** perturbations (knockdown only) and of **off-panel** targets (named
  ``OFFxxxx``: no visible knockdown);
* **negative-binomial** counts around per-context baselines, a mild batch effect and log-normal
  library sizes.

``uns['true_effects']`` holds the natural-log mean shifts like ``make_effects_adata``, so
:func:`state.datasets.synthetic_effects.truth_table` reads the truth of either generator.
"""

from __future__ import annotations

import anndata as ad
import numpy as np

from state.datasets.synthetic import celltype_names, gene_symbols
from state.datasets.synthetic_effects import counts_screen


def program_effects(rng, *, n_genes, n_perts, n_contexts, n_programs=8, context_gain_sd=0.5, specific_scale=0.0,
                    n_specific_programs=3, null_fraction=0.1, off_panel_fraction=0.1, knockdown=0.15):
    """(effects [C, P, G] natural-log mean shifts, target gene per perturbation or -1 when off panel)."""
    def sparse_programs(k):
        loadings = np.zeros((k, n_genes))
        for i in range(k):
            genes = rng.choice(n_genes, size=max(4, n_genes // 12), replace=False)
            loadings[i, genes] = rng.normal(0.0, 0.6, len(genes))
        return loadings

    programs = sparse_programs(n_programs)
    activity = np.zeros((n_perts, n_programs))
    for p in range(n_perts):
        on = rng.choice(n_programs, size=rng.integers(1, 3), replace=False)
        activity[p, on] = rng.choice([-1.0, 1.0], len(on)) * np.exp(rng.normal(0.0, 0.3, len(on)))
    kinds = rng.permutation(n_perts)
    n_null, n_off = round(null_fraction * n_perts), round(off_panel_fraction * n_perts)
    activity[kinds[:n_null]] = 0.0
    shared = activity @ programs  # [P, G]
    gain = np.exp(rng.normal(0.0, context_gain_sd, n_contexts))  # one scalar per context
    effects = gain[:, None, None] * shared[None]
    for c in range(n_contexts):
        private = sparse_programs(n_specific_programs)
        mixing = rng.normal(0.0, 1.0, (n_programs, n_specific_programs))
        effects[c] += specific_scale * (activity @ mixing) @ private
    targets = rng.choice(n_genes, size=n_perts, replace=False)
    targets[kinds[n_null:n_null + n_off]] = -1
    for p, t in enumerate(targets):
        if t >= 0:
            effects[:, p, t] = np.log(knockdown)
    return effects, targets


def make_program_screen(*, n_contexts=3, n_perts=60, n_genes=200, cells_per_pert=30, control_cells=300,
                        counts_per_gene=4.0, dispersion=3.0, seed=0, **effect_options) -> ad.AnnData:
    """Raw counts (CSR float32), obs gene / cell_type / gem_group, the truth in ``uns['true_effects']``.

    ``effect_options`` go to :func:`program_effects` (``context_gain_sd``, ``specific_scale``,
    ``n_programs``, ``null_fraction``, ``off_panel_fraction``, ``knockdown``)."""
    rng = np.random.default_rng([seed, 31337])
    genes = gene_symbols(n_genes)
    contexts = celltype_names(n_contexts)
    effects, targets = program_effects(rng, n_genes=n_genes, n_perts=n_perts, n_contexts=n_contexts, **effect_options)
    names = [genes[t] if t >= 0 else f"OFF{p:04d}" for p, t in enumerate(targets)]
    log_base = rng.normal(0.0, 1.2, n_genes)
    base = np.exp(log_base) / np.exp(log_base).sum()
    ctx_fx = rng.normal(0.0, 0.5, (n_contexts, n_genes))
    per_ctx = control_cells + n_perts * cells_per_pert
    ctx_codes = np.repeat(np.arange(n_contexts), per_ctx)
    pert_codes = np.tile(np.concatenate([np.zeros(control_cells, int),
                                         np.repeat(np.arange(1, n_perts + 1), cells_per_pert)]), n_contexts)
    order = rng.permutation(len(ctx_codes))
    ctx_codes, pert_codes = ctx_codes[order], pert_codes[order]
    return counts_screen(rng, ctx_codes=ctx_codes, pert_codes=pert_codes, effects=effects, ctx_fx=ctx_fx,
                         base=base, names=names, contexts=contexts, genes=genes, counts_per_gene=counts_per_gene,
                         dispersion=dispersion, batch_sd=0.08, library_sd=0.35)
