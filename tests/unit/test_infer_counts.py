"""``tx infer --output-counts``: integer counts from log1p predictions (state.tx.infer.counts)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from state.io.columns import InputColumns
from state.tx.infer import counts as tc
from state.utils.errors import StateError


def _log1p_prediction(n_cells=50, n_genes=80, seed=0, target=1e4):
    rng = np.random.default_rng(seed)
    raw = rng.negative_binomial(2, 0.05, size=(n_cells, n_genes)).astype(np.float64)
    return np.log1p(raw / raw.sum(axis=1, keepdims=True) * target).astype(np.float32)


def _expected(pred, sizes):
    e = np.expm1(pred.astype(np.float64))
    return e / e.sum(axis=1, keepdims=True) * sizes[:, None]


@pytest.mark.parametrize("method", tc.METHODS)
def test_counts_are_integers_with_the_requested_totals_and_fixed_by_seed(method):
    pred = _log1p_prediction()
    sizes = np.linspace(2_000, 30_000, pred.shape[0]).round()
    out = tc.log1p_to_counts(pred, sizes, method=method, rng=np.random.default_rng(1))
    again = tc.log1p_to_counts(pred, sizes, method=method, rng=np.random.default_rng(1))
    other = tc.log1p_to_counts(pred, sizes, method=method, rng=np.random.default_rng(2))
    assert sp.issparse(out) and out.shape == pred.shape and out.dtype == np.int32
    assert out.data.min() >= 0
    assert (out != again).nnz == 0 and (out != other).nnz > 0
    totals = np.asarray(out.sum(axis=1)).ravel()
    if method == "multinomial":
        np.testing.assert_array_equal(totals, sizes)
    else:  # one Bernoulli per gene: the total moves by far less than a percent here
        assert np.all(np.abs(totals - sizes) / sizes < 0.01)


def test_stochastic_rounding_is_within_one_count_and_round_trips():
    pred = _log1p_prediction(seed=3)
    sizes = np.full(pred.shape[0], 20_000.0)
    counts = tc.log1p_to_counts(pred, sizes, method="stochastic", rng=np.random.default_rng(0)).toarray()
    expected = _expected(pred, sizes)
    assert np.all(np.abs(counts - expected) < 1.0)
    # the documented round trip: log1p(normalise(counts) to the prediction's own total) ~ prediction
    target = np.expm1(pred.astype(np.float64)).sum(axis=1, keepdims=True)
    back = np.log1p(counts / counts.sum(axis=1, keepdims=True) * target)
    large = expected > 50  # where one count is < 2% of the value
    assert np.abs(back - pred)[large].max() < 0.05
    assert np.abs(back - pred).mean() < 0.1


def test_chunked_conversion_matches_one_block(monkeypatch):
    pred = _log1p_prediction(n_cells=30)
    sizes = np.full(30, 5_000.0)
    whole = tc.log1p_to_counts(pred, sizes, rng=np.random.default_rng(4))
    monkeypatch.setattr(tc, "_CHUNK_ROWS", 7)
    chunked = tc.log1p_to_counts(pred, sizes, rng=np.random.default_rng(4))
    assert (whole != chunked).nnz == 0


def _input_with_controls(n=40, n_genes=30):
    rng = np.random.default_rng(5)
    raw = rng.poisson(20, size=(n, n_genes)).astype(np.float32)
    raw[n // 2:] *= 3  # second cell type sequenced three times deeper
    adata = ad.AnnData(sp.csr_matrix(np.log1p(raw / raw.sum(1, keepdims=True) * 1e4).astype(np.float32)))
    adata.layers["counts"] = sp.csr_matrix(raw)
    adata.obs["pert"] = pd.Categorical((["ctrl", "p1"] * n)[:n])
    adata.obs["ct"] = np.repeat(["a", "b"], n // 2)
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    return adata, raw.sum(1)


def _columns(celltype_col="ct"):
    return InputColumns(pert_col="pert", control="ctrl", celltype_col=celltype_col, batch_col=None,
                        embed_key=None, cli=True)


def test_library_sizes_come_from_the_raw_counts_of_each_cell_types_controls():
    adata, depth = _input_with_controls()
    plan = tc.plan_counts(adata, _columns(), method="stochastic", seed=0, output_space="gene", output="o.h5ad")
    assert plan.libraries.source == "layers['counts']"
    is_ctrl = adata.obs["pert"].to_numpy() == "ctrl"
    np.testing.assert_array_equal(plan.libraries.by_group["a"], depth[is_ctrl & (adata.obs["ct"] == "a").to_numpy()])
    drawn = tc.draw_library_sizes(plan.libraries, plan.groups, np.random.default_rng(0))
    assert set(drawn[plan.groups == "a"]) <= set(plan.libraries.by_group["a"])
    assert set(drawn[plan.groups == "b"]) <= set(plan.libraries.by_group["b"])
    assert drawn[plan.groups == "b"].min() > drawn[plan.groups == "a"].max()


def test_library_size_sources_in_order_and_the_log1p_fallback(caplog):
    adata, depth = _input_with_controls()
    is_ctrl = adata.obs["pert"].to_numpy() == "ctrl"
    groups = np.full(adata.n_obs, "all")
    raw_x = adata.copy()
    del raw_x.layers["counts"]
    raw_x.X = sp.csr_matrix(adata.layers["counts"])
    assert tc.control_library_sizes(raw_x, is_ctrl, groups).source == "X"
    log_only = adata.copy()
    del log_only.layers["counts"]
    with caplog.at_level(logging.WARNING, logger="state.tx.infer.counts"):
        libraries = tc.control_library_sizes(log_only, is_ctrl, groups)
    assert libraries.source == "sum(expm1(X))" and "normalisation target" in caplog.text
    np.testing.assert_allclose(libraries.by_group["*"], 1e4, rtol=1e-3)
    with pytest.raises(StateError, match="needs control cells"):
        tc.control_library_sizes(adata, np.zeros(adata.n_obs, bool), groups)


def test_apply_counts_replaces_x_and_records_the_rule():
    adata, _ = _input_with_controls()
    plan = tc.plan_counts(adata, _columns(None), method="stochastic", seed=9, output_space="all", output="o.h5ad")
    adata.X = adata.X.toarray()  # what infer leaves in X: dense float32 log1p predictions
    out = tc.apply_counts(plan, adata.copy(), in_x=True)
    again = tc.apply_counts(plan, adata.copy(), in_x=True)
    assert out.X.dtype == np.int32 and (out.X != again.X).nnz == 0
    record = out.uns["state_counts"]
    assert record["method"] == "stochastic" and record["seed"] == 9 and record["library_size_source"] == "layers['counts']"
    with pytest.raises(StateError, match="obsm"):
        tc.apply_counts(plan, adata.copy(), in_x=False)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(output="o.npy"), "h5ad"),
    (dict(output_space="embedding"), "gene-space"),
    (dict(method="round"), "unknown counts method"),
])  # fmt: skip
def test_plan_counts_refuses_what_it_cannot_write(kwargs, message):
    adata, _ = _input_with_controls()
    args = dict(method="stochastic", seed=0, output_space="gene", output="o.h5ad") | kwargs
    with pytest.raises(StateError, match=message):
        tc.plan_counts(adata, _columns(), **args)


def test_prediction_in_x_follows_the_output_slots():
    preds, counts = np.zeros((2, 5)), np.zeros((2, 5))
    assert tc.prediction_in_x(embed_key=None, output_space="gene", preds=preds, counts=None, n_vars=5)
    assert not tc.prediction_in_x(embed_key=None, output_space="gene", preds=preds, counts=None, n_vars=6)
    assert tc.prediction_in_x(embed_key="X_hvg", output_space="all", preds=np.zeros((2, 3)), counts=counts, n_vars=5)
    assert not tc.prediction_in_x(embed_key="X_hvg", output_space="gene", preds=np.zeros((2, 3)), counts=counts,
                                  n_vars=5)


def test_counts_pass_cell_eval2_input_validation():
    norm = pytest.importorskip("cell_eval2.norm")
    adata, _ = _input_with_controls()
    plan = tc.plan_counts(adata, _columns(), method="stochastic", seed=0, output_space="gene", output="o.h5ad")
    adata.X = adata.X.toarray()
    with pytest.raises(ValueError, match="fractional"):  # the log1p prediction itself is refused
        norm.validate_input_type(adata, "counts")
    out = tc.apply_counts(plan, adata, in_x=True)
    norm.validate_input_type(out, "counts")
    norm.check_scale_limit(out, "counts", 1e6)
