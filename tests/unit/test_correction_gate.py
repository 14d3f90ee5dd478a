"""state_plus's gate: the blend of the learned correction, judged on held-out perturbations."""

from __future__ import annotations

import numpy as np
import torch

from state.tx.models.correction_gate import Judge, choose_blend, held_out_groups


def _groups(seed=0, n=12, width=40):
    rng = np.random.default_rng(seed)
    residual = rng.normal(size=(n, width))  # what the base gets wrong on each held-out group
    return rng, residual


def test_a_correction_that_is_noise_gets_blend_zero():
    for seed in range(10):
        rng, residual = _groups(seed)
        decision = choose_blend(rng.normal(size=residual.shape), residual)
        assert decision.blend == 0.0 and not decision.earns_keep
        assert decision.score == decision.base_error


def test_a_correction_that_explains_the_miss_is_kept_and_scaled():
    rng, residual = _groups(1)
    correction = 2.0 * residual + 0.3 * rng.normal(size=residual.shape)  # right direction, twice too large
    decision = choose_blend(correction, residual)
    assert 0.4 < decision.blend < 0.6 and decision.cv_error < 0.2 * decision.base_error


def test_a_zero_correction_or_too_few_groups_keep_the_base():
    _, residual = _groups(2)
    assert choose_blend(np.zeros_like(residual), residual).blend == 0.0
    assert choose_blend(residual[:1], residual[:1]).blend == 0.0  # one group: nothing to judge a blend on


def test_held_out_groups_follow_the_seed_skip_val_contexts_and_leave_training_perturbations():
    groups = [(c, f"p{i}") for c in ("A", "B", "C") for i in range(20)] + [("D", "p0"), ("D", "p1")]
    chosen = held_out_groups(groups, skip_contexts={"C"}, seed=0, fraction=0.1, max_groups=64)
    assert chosen == held_out_groups(groups, skip_contexts={"C"}, seed=0, fraction=0.1, max_groups=64)
    assert chosen != held_out_groups(groups, skip_contexts={"C"}, seed=1, fraction=0.1, max_groups=64)
    by_ctx = {c: sum(g[0] == c for g in chosen) for c in "ABCD"}
    assert by_ctx == {"A": 2, "B": 2, "C": 0, "D": 0}  # C judged on its val perturbations, D too small
    assert len(held_out_groups(groups, skip_contexts=(), seed=0, fraction=0.5, max_groups=8)) <= 8


def test_held_out_sets_leave_the_training_batch():
    judge = Judge(control="ctrl", max_groups=8)
    judge.held_out = {("A", "p1")}
    batch = {"pert_name": ["p0"] * 2 + ["p1"] * 2 + ["p2"] * 2, "cell_type": ["A"] * 6,
             "pert_cell_emb": torch.arange(6.0)[:, None]}
    kept = judge.keep_for_training(batch, set_len=2)
    assert kept["pert_name"] == ["p0", "p0", "p2", "p2"]
    assert kept["pert_cell_emb"].flatten().tolist() == [0.0, 1.0, 4.0, 5.0]
    assert judge.keep_for_training({**batch, "pert_name": ["p1"] * 6}, set_len=2) is None


def test_held_out_sets_leave_the_fast_loaders_lazy_names_too():
    """The fast loader's batches carry names as codes made into strings on access (LazyStrings), not lists:
    they must lose the held-out sets with the tensors, or names and rows no longer line up."""
    from state.tx.data.fast_batch import LazyStrings

    judge = Judge(control="ctrl", max_groups=8)
    judge.held_out = {("A", "p1")}
    names = LazyStrings(np.array([0, 0, 1, 1, 2, 2]), np.array(["p0", "p1", "p2"], dtype=object))
    contexts = LazyStrings(np.zeros(6, dtype=np.int64), np.array(["A"], dtype=object))
    batch = {"pert_name": names, "cell_type": contexts, "pert_cell_emb": torch.arange(6.0)[:, None]}
    kept = judge.keep_for_training(batch, set_len=2)
    assert list(kept["pert_name"]) == ["p0", "p0", "p2", "p2"] and len(kept["cell_type"]) == 4
    assert kept["pert_cell_emb"].flatten().tolist() == [0.0, 1.0, 4.0, 5.0]
