"""A Norman-shaped combinatorial screen with known effects: singles, doubles, and how they interact.

One cell line, ``n_singles`` single-gene perturbations (labelled ``GENE+ctrl`` as in Norman et al.
2019 / GEARS) and ``n_doubles`` pairs (``GENE1+GENE2``), control cells labelled ``ctrl``. Each
single's log-mean shift mixes one or two of a few shared gene programs plus private genes, as in
:mod:`state.datasets.synthetic_effects`. A double's shift is the sum of its parts' (additive), except:

* ``dominant``: a part flagged dominant (a share of the singles; its effect masks its partner's,
  epistasis) -> the double shows that part's shift only;
* ``synergy``: both parts share a program -> the sum plus that program once more (amplified);
* ``buffering``: both parts are flagged buffering genes -> half the sum.

The kind of a double follows from its parts (a flag or a shared program), so it can be learnt from
training doubles of the same parts. ``uns['true_effects']`` holds the truth (``values`` [labels,
genes], ``perturbations``) and ``uns['combination_kinds']`` each double's kind.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.datasets.synthetic import gene_symbols

CONTROL = "ctrl"
KINDS = ("additive", "synergy", "buffering", "dominant")


def _single_effects(rng, n_singles: int, n_genes: int, n_programs: int):
    programs = np.zeros((n_programs, n_genes))
    for k in range(n_programs):
        genes = rng.choice(n_genes, size=max(3, n_genes // 10), replace=False)
        programs[k, genes] = rng.choice([-1.0, 1.0], size=len(genes)) * rng.uniform(0.4, 1.0, len(genes))
    member = np.zeros((n_singles, n_programs), bool)
    effects = np.zeros((n_singles, n_genes))
    for p in range(n_singles):
        active = rng.choice(n_programs, size=rng.integers(1, 3), replace=False)
        member[p, active] = True
        effects[p] = rng.uniform(0.4, 0.9, len(active)) @ programs[active]
        private = rng.choice(n_genes, size=max(2, n_genes // 40), replace=False)
        effects[p, private] += rng.choice([-1.0, 1.0], size=len(private)) * rng.uniform(0.3, 0.8, len(private))
    return effects, programs, member


def _pairs(rng, n_singles: int, n_doubles: int, member: np.ndarray, interacting_share: float):
    """Pairs of distinct singles: about ``interacting_share`` of them share a program (synergy
    candidates), the rest are drawn at random."""
    same = [(a, b) for a in range(n_singles) for b in range(a + 1, n_singles) if (member[a] & member[b]).any()]
    chosen: set[tuple[int, int]] = set()
    for i in rng.permutation(len(same))[: round(interacting_share * n_doubles * 0.5)]:
        chosen.add(same[i])
    while len(chosen) < n_doubles:
        a, b = sorted(rng.choice(n_singles, size=2, replace=False).tolist())
        chosen.add((a, b))
    return sorted(chosen)


def double_effect(a: int, b: int, effects, programs, member, dominant, buffering) -> tuple[np.ndarray, str]:
    """The true shift of the double (a, b) and its kind (see the module docstring)."""
    total = effects[a] + effects[b]
    if dominant[a] != dominant[b]:
        return effects[a if dominant[a] else b].copy(), "dominant"
    shared = np.flatnonzero(member[a] & member[b])
    if len(shared):
        return total + programs[shared].sum(axis=0), "synergy"
    if buffering[a] and buffering[b]:
        return 0.5 * total, "buffering"
    return total, "additive"


def make_combination_adata(*, n_singles: int = 100, n_doubles: int = 130, n_genes: int = 200, n_programs: int = 16,
                           cells_per_pert: int = 20, control_cells: int = 600, dominant_share: float = 0.06,
                           buffering_share: float = 0.35, interacting_share: float = 0.4,
                           counts_per_gene: float = 4.0, dispersion: float = 5.0, seed: int = 0) -> ad.AnnData:
    """Raw counts (CSR float32) with obs ``gene`` (labels), ``cell_type`` (one line), ``gem_group``."""
    rng = np.random.default_rng(seed)
    genes = gene_symbols(n_genes)
    effects, programs, member = _single_effects(rng, n_singles, n_genes, n_programs)
    dominant = rng.random(n_singles) < dominant_share
    buffering = rng.random(n_singles) < buffering_share
    names = [f"P{p:03d}" for p in range(n_singles)]  # the targets are off the gene panel
    labels = [f"{n}+{CONTROL}" for n in names]
    truth = [effects[p] for p in range(n_singles)]
    kinds: dict[str, str] = {}
    for a, b in _pairs(rng, n_singles, n_doubles, member, interacting_share):
        value, kind = double_effect(a, b, effects, programs, member, dominant, buffering)
        label = f"{names[a]}+{names[b]}"
        labels.append(label)
        truth.append(value)
        kinds[label] = kind
    truth = np.stack(truth)
    codes = np.concatenate([np.zeros(control_cells, int), np.repeat(np.arange(1, len(labels) + 1), cells_per_pert)])
    codes = codes[rng.permutation(len(codes))]
    log_base = rng.normal(0.0, 1.0, size=n_genes)
    base = np.exp(log_base) / np.exp(log_base).sum()
    batch_codes = rng.integers(0, 2, size=len(codes))
    batch_fx = rng.normal(0.0, 0.1, size=(2, n_genes))
    padded = np.concatenate([np.zeros((1, n_genes)), truth])
    library = np.exp(rng.normal(np.log(counts_per_gene * n_genes), 0.3, size=len(codes)))
    mu = library[:, None] * base[None, :] * np.exp(batch_fx[batch_codes] + padded[codes])
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)
    obs = pd.DataFrame({
        "gene": pd.Categorical.from_codes(codes, [CONTROL, *labels]),
        "cell_type": pd.Categorical.from_codes(np.zeros(len(codes), int), ["K562"]),
        "gem_group": pd.Categorical.from_codes(batch_codes, ["batch1", "batch2"]),
    }, index=pd.Index([f"cell{i:06d}" for i in range(len(codes))]))
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame({"gene_name": genes}, index=genes))
    adata.uns["true_effects"] = {"values": truth.astype(np.float32), "perturbations": labels}
    adata.uns["combination_kinds"] = {"labels": list(kinds), "kinds": list(kinds.values())}
    return adata


def truth_table(adata: ad.AnnData) -> pd.DataFrame:
    """True log-mean shifts, one row per label, one column per gene."""
    truth = adata.uns["true_effects"]
    return pd.DataFrame(np.asarray(truth["values"]), index=list(truth["perturbations"]), columns=adata.var_names)


def combination_kinds(adata: ad.AnnData) -> dict[str, str]:
    kinds = adata.uns["combination_kinds"]
    return dict(zip(kinds["labels"], kinds["kinds"]))
