"""The response table and the ``linear`` baseline's fit on exact, tiny pseudo-bulk responses."""

from __future__ import annotations

import numpy as np
import pytest

from state.tx.models.linear_fit import cross_validate_context, fit_context_lines, parse_ridge
from state.tx.models.mean_response import MeanResponses


def _table(rng, n_perts=12, width=5):
    """Three contexts; ctxC responds with intercept 0.3 and gain 2 to what ctxA/ctxB share."""
    shared = rng.normal(size=(n_perts, width))
    responses = {}
    for p in range(n_perts):
        responses[("ctxA", f"p{p}")] = shared[p]
        responses[("ctxB", f"p{p}")] = shared[p]
        if p < n_perts // 2:  # ctxC saw only half of the perturbations (few-shot)
            responses[("ctxC", f"p{p}")] = 0.3 + 2.0 * shared[p]
    return MeanResponses(responses, width), shared


def test_elsewhere_leaves_the_own_context_out_and_unknowns_are_zero():
    table, shared = _table(np.random.default_rng(0))
    np.testing.assert_allclose(table.elsewhere("ctxC", "p0"), shared[0], atol=1e-6)
    np.testing.assert_allclose(table.elsewhere("ctxA", "p0"), (shared[0] + 0.3 + 2 * shared[0]) / 2, atol=1e-5)
    np.testing.assert_allclose(table.elsewhere(None, "p9"), shared[9], atol=1e-6)  # only ctxA, ctxB saw p9
    assert not table.elsewhere("ctxA", "never-seen").any()
    again = MeanResponses.from_checkpoint(table.to_checkpoint())
    np.testing.assert_array_equal(again.elsewhere("ctxA", "p3"), table.elsewhere("ctxA", "p3"))


def test_linear_lines_recover_the_few_shot_context_gain():
    table, shared = _table(np.random.default_rng(1))
    lines, _ = fit_context_lines(table, ridge=1e-6)
    intercept, slope = lines["ctxC"]
    np.testing.assert_allclose(intercept, 0.3, atol=1e-3)
    np.testing.assert_allclose(slope, 2.0, atol=1e-3)
    # a held-out perturbation of ctxC: the line predicts it, perturb_mean (the mean elsewhere) does not
    predicted = intercept + slope * table.elsewhere("ctxC", "p10")
    np.testing.assert_allclose(predicted, 0.3 + 2.0 * shared[10], atol=1e-3)


def test_linear_ridge_shrinks_towards_perturb_mean():
    table, _ = _table(np.random.default_rng(2))
    intercept, slope = fit_context_lines(table, ridge=1e6)[0]["ctxC"]
    assert np.abs(intercept).max() < 1e-3 and np.abs(slope - 1.0).max() < 1e-3


@pytest.mark.parametrize("ridge", [1e-6, 0.1])
def test_linear_lines_are_finite_for_a_context_with_one_perturbation(ridge):
    table = MeanResponses({("a", "p"): np.ones(3), ("b", "p"): np.ones(3) * 2, ("b", "q"): np.zeros(3)}, 3)
    lines, _ = fit_context_lines(table, ridge=ridge)
    assert set(lines) == {"a", "b"} and all(np.isfinite(v).all() for v in lines.values())


def _noise_or_line(line: bool, seed: int = 0, n_perts: int = 12, width: int = 300):
    """x = the response elsewhere; y = a line of it plus noise, or x plus pure noise (no line to find)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_perts, width))
    noise = 0.5 * rng.normal(size=(n_perts, width))
    return x, (0.3 + 2.0 * x + noise) if line else (x + noise)


def test_cv_picks_perturb_mean_when_the_line_is_pure_noise():
    choices = [cross_validate_context(*_noise_or_line(line=False, seed=seed)) for seed in range(10)]
    assert all(len(c.candidates) == len(c.cv_error) > 10 for c in choices)  # every candidate scored, recorded
    assert all(c.chosen == "perturb_mean" and c.ridge is None for c in choices)


def test_cv_picks_a_line_when_the_data_come_from_one():
    x, y = _noise_or_line(line=True)
    choice = cross_validate_context(x, y)
    assert choice.ridge is not None and choice.ridge < 1.0
    errors = dict(zip(choice.candidates, choice.cv_error))
    assert errors[choice.chosen] < 0.5 * errors["perturb_mean"]


def test_cv_loo_error_matches_refitting_without_each_perturbation():
    from state.tx.models.linear_fit import loo_errors

    x, y = _noise_or_line(line=True, n_perts=6, width=20)
    ridge, n = 0.3, 6
    lam_a, lam_s = ridge * n, ridge * float((x**2).sum(axis=0).mean())  # penalties of the full fit, held fixed
    brute = []
    for i in range(n):
        keep = np.arange(n) != i
        xk, rk = x[keep], (y - x)[keep]
        m00, m11, m01 = keep.sum() + lam_a, (xk**2).sum(axis=0) + lam_s, xk.sum(axis=0)
        det = m00 * m11 - m01**2
        a = (m11 * rk.sum(axis=0) - m01 * (xk * rk).sum(axis=0)) / det
        ds = (m00 * (xk * rk).sum(axis=0) - m01 * rk.sum(axis=0)) / det
        brute.append(np.mean(((y - x)[i] - a - ds * x[i]) ** 2))
    np.testing.assert_allclose(loo_errors(x, y, ridge), brute, rtol=1e-8)


def test_cv_context_with_too_few_perturbations_gets_perturb_mean():
    table = MeanResponses({("a", "p"): np.ones(3), ("b", "p"): np.ones(3) * 2, ("b", "q"): np.zeros(3)}, 3)
    lines, choices = fit_context_lines(table)
    assert choices["a"].chosen == "perturb_mean"
    np.testing.assert_array_equal(lines["a"], [[0, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize("value", [-1, "-0.5", "ten", None, True, float("nan")])
def test_bad_ridge_is_one_line_naming_the_override_and_the_fix(value):
    from state.utils.errors import StateError

    with pytest.raises(StateError) as err:
        parse_ridge(value, key="model.kwargs.linear_ridge")
    text = str(err.value)
    assert "\n" not in text and "model.kwargs.linear_ridge=" in text and "auto" in text and "fix:" in text


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("AUTO", "auto"), (0, 0.0), ("10", 10.0), (0.1, 0.1)])
def test_good_ridges_parse(value, expected):
    assert parse_ridge(value, key="model.kwargs.ridge") == expected


def test_baseline_prediction_is_a_same_context_control_plus_the_response():
    import anndata as ad
    import pandas as pd

    from state.tx.predict.baselines import baseline_adata

    table, shared = _table(np.random.default_rng(3))
    obs = pd.DataFrame({"gene": ["ctrl", "ctrl", "p9", "p9", "ctrl", "p1"],
                        "cell_type": ["ctxC", "ctxC", "ctxC", "ctxC", "ctxA", "ctxA"]})
    x = np.abs(np.random.default_rng(4).normal(size=(6, 5))).astype(np.float32) + 5.0  # far from the 0 clip
    x[1] = x[0]  # both ctxC controls equal: the drawn control is known
    real = ad.AnnData(X=x, obs=obs)
    pm = baseline_adata(real, table, kind="perturb_mean", control="ctrl", pert_col="gene", cell_type_key="cell_type")
    np.testing.assert_allclose(pm.X[2], x[0] + shared[9], atol=1e-5)
    np.testing.assert_allclose(pm.X[5], x[4] + table.elsewhere("ctxA", "p1"), atol=1e-5)
    np.testing.assert_array_equal(pm.X[[0, 1, 4]], x[[0, 1, 4]])  # controls are not predicted
    lin = baseline_adata(real, table, kind="linear", control="ctrl", pert_col="gene", cell_type_key="cell_type")
    truth = x[0] + 0.3 + 2.0 * shared[9]  # ctxC's gain: the linear baseline learns it (shrunk), perturb_mean not
    assert np.abs(lin.X[3] - truth).sum() < 0.5 * np.abs(pm.X[3] - truth).sum()


def test_baseline_control_draws_use_each_control_once_per_perturbation_and_follow_the_seed():
    from state.tx.predict.baselines import control_draws

    controls = np.arange(100, 110)
    perts = np.array(["a"] * 10 + ["b"] * 4 + ["c"] * 13)
    draws = control_draws(controls, perts, np.random.default_rng(0))
    assert sorted(draws[:10]) == list(controls)  # no control twice while the pool lasts
    assert len(set(draws[10:14])) == 4 and set(draws) <= set(controls)
    assert sorted(draws[14:24]) == list(controls) and set(draws[24:]) <= set(draws[14:24])  # then cycled
    again = control_draws(controls, perts, np.random.default_rng(0))
    other = control_draws(controls, perts, np.random.default_rng(1))
    np.testing.assert_array_equal(draws, again)
    assert not np.array_equal(draws, other)
