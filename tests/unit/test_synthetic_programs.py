"""The latent-program screen generator (the quality grid's independent data)."""

from __future__ import annotations

import numpy as np

from state.datasets.synthetic_effects import truth_table
from state.datasets.synthetic_programs import make_program_screen

SMALL = {"n_perts": 20, "n_genes": 60, "cells_per_pert": 4, "control_cells": 20}


def _effects(adata):
    truth = truth_table(adata)
    contexts = sorted(set(truth.index.get_level_values(0)))
    return np.stack([truth.loc[c].to_numpy() for c in contexts]), list(truth.loc[contexts[0]].index)


def test_gain_only_contexts_are_scalar_multiples_of_each_other_off_the_knocked_down_gene():
    adata = make_program_screen(seed=0, specific_scale=0.0, **SMALL)
    effects, names = _effects(adata)  # [C, P, G]
    genes = list(adata.var_names)
    for p, name in enumerate(names):
        keep = np.array([g != name for g in genes])
        shared = effects[0, p, keep]
        if not shared.any():
            continue  # a null perturbation: knockdown only
        for c in (1, 2):
            ratio = effects[c, p, keep][shared != 0] / shared[shared != 0]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)  # one gain per context


def test_context_specific_part_breaks_the_scalar_relation_and_follows_the_seed():
    plain = make_program_screen(seed=1, specific_scale=0.0, **SMALL)
    specific = make_program_screen(seed=1, specific_scale=1.0, **SMALL)
    a, _ = _effects(plain)
    b, _ = _effects(specific)
    corr = lambda e: np.nanmean([np.corrcoef(e[0, p], e[2, p])[0, 1] for p in range(e.shape[1]) if e[0, p].std()])  # noqa: E731
    assert corr(b) < corr(a) - 0.2
    again = make_program_screen(seed=1, specific_scale=1.0, **SMALL)
    np.testing.assert_array_equal(again.X.toarray(), specific.X.toarray())


def test_knockdown_null_and_off_panel_perturbations_and_integer_counts():
    adata = make_program_screen(seed=2, null_fraction=0.2, off_panel_fraction=0.2, **SMALL)
    effects, names = _effects(adata)
    genes = list(adata.var_names)
    off = [p for p, n in enumerate(names) if n.startswith("OFF")]
    assert len(off) == 4
    on_panel = [p for p, n in enumerate(names) if not n.startswith("OFF")]
    for p in on_panel:
        np.testing.assert_allclose(effects[:, p, genes.index(names[p])], np.log(0.15), rtol=1e-6)
    null = [p for p in on_panel if np.count_nonzero(effects[0, p]) == 1]  # knockdown only
    assert len(null) == 4
    x = adata.X.toarray()
    assert (x == np.round(x)).all() and x.min() >= 0 and (x == 0).mean() < 0.9
    assert set(adata.obs["gene"].cat.categories) == {"non-targeting", *names}
