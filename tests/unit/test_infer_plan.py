"""The pure parts of `state tx infer`: window planning, basal sampling, input edits, output slots."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from state.tx.infer import edits as infer_edits
from state.tx.infer.run import write_predictions
from state.tx.infer.simulate import feature_reader, plan_windows
from state.utils.errors import StateError


def _labels_groups():
    labels = np.array(["ctl", "A", "A", "ctl", "B", "A", "ctl", "A", "A", "B"])
    groups = np.array(["x", "x", "x", "x", "x", "x", "y", "y", "y", "y"])
    return labels, groups


def test_windows_cover_every_row_once_in_file_order():
    labels, groups = _labels_groups()
    windows, skipped = plan_windows(labels, groups, control="ctl", set_len=2, seed=0)
    assert skipped == []
    rows = np.concatenate([w.rows for w in windows])
    assert sorted(rows.tolist()) == list(range(labels.size))
    for w in windows:
        assert w.rows.size <= 2
        assert np.all(np.diff(w.rows) > 0)
        assert set(labels[w.rows]) == {w.pert}
    # groups sorted, then perturbations sorted: x/A, x/B, x/ctl, y/A, y/B, y/ctl
    order = [(w.group, w.pert) for w in windows]
    assert order == sorted(order)


def test_basal_cells_come_from_the_same_group_controls():
    labels, groups = _labels_groups()
    windows, _ = plan_windows(labels, groups, control="ctl", set_len=3, seed=1)
    for w in windows:
        assert np.all(labels[w.basal] == "ctl")
        assert np.all(groups[w.basal] == w.group)


def test_group_without_controls_falls_back_to_all_controls():
    labels = np.array(["ctl", "A", "A"])
    groups = np.array(["x", "y", "y"])
    windows, skipped = plan_windows(labels, groups, control="ctl", set_len=4, seed=0)
    assert skipped == []
    y_window = next(w for w in windows if w.group == "y")
    assert y_window.basal.tolist() == [0, 0]


def test_no_control_anywhere_skips_rows():
    labels = np.array(["A", "B"])
    windows, skipped = plan_windows(labels, np.array(["x", "x"]), control="ctl", set_len=4, seed=0)
    assert windows == [] and skipped == ["x"]


def test_sampling_matches_one_shared_randomstate_stream():
    labels, groups = _labels_groups()
    windows, _ = plan_windows(labels, groups, control="ctl", set_len=2, seed=42)
    rng = np.random.RandomState(42)
    for w in windows:
        pool = np.flatnonzero((groups == w.group) & (labels == "ctl"))
        assert w.basal.tolist() == rng.choice(pool, size=w.rows.size, replace=True).tolist()


def test_plan_is_deterministic_and_seed_dependent():
    labels = np.array(["ctl"] * 20 + ["A"] * 30)
    groups = np.array(["x"] * 50)
    a, _ = plan_windows(labels, groups, control="ctl", set_len=8, seed=3)
    b, _ = plan_windows(labels, groups, control="ctl", set_len=8, seed=3)
    c, _ = plan_windows(labels, groups, control="ctl", set_len=8, seed=4)
    assert all(np.array_equal(x.basal, y.basal) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x.basal, y.basal) for x, y in zip(a, c, strict=True))


def _adata(n=12, sparse=True):
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, size=(n, 5)).astype(np.float32)
    obs = pd.DataFrame(
        {"gene": pd.Categorical(["ctl"] * 6 + ["A"] * 4 + ["B"] * 2), "cell_type": pd.Categorical(["x"] * n)},
        index=[f"c{i}" for i in range(n)],
    )
    a = ad.AnnData(X=sp.csr_matrix(x) if sparse else x, obs=obs)
    a.obsm["X_emb"] = rng.normal(size=(n, 3)).astype(np.float32)
    return a


@pytest.mark.parametrize("sparse", [True, False])
def test_feature_reader_handles_sparse_dense_and_obsm(sparse):
    a = _adata(sparse=sparse)
    read, width = feature_reader(a, None)
    dense = a.X.toarray() if sparse else a.X
    assert width == 5
    np.testing.assert_array_equal(read(np.array([3, 3, 0])), dense[[3, 3, 0]])
    read_emb, width_emb = feature_reader(a, "X_emb")
    assert width_emb == 3
    np.testing.assert_array_equal(read_emb(np.array([1])), a.obsm["X_emb"][[1]])
    with pytest.raises(StateError, match="obsm\\['missing'\\]"):
        feature_reader(a, "missing")


def test_tsv_padding_appends_control_clones(tmp_path):
    a = _adata()
    tsv = tmp_path / "req.tsv"
    tsv.write_text("perturbation\tnum_cells\nA\t3\nNEW\t2\n")
    out = infer_edits.pad_from_tsv(a, infer_edits.read_tsv_requests(tsv), pert_col="gene", control="ctl", seed=0)
    assert out.n_obs == a.n_obs + 5
    new = out[a.n_obs :]
    assert new.obs["gene"].astype(str).tolist() == ["A"] * 3 + ["NEW"] * 2
    ctrl_rows = a.X[:6].toarray()
    for row in new.X.toarray():
        assert any(np.array_equal(row, c) for c in ctrl_rows)
    assert a.n_obs == 12  # input untouched


def test_tsv_with_wrong_columns_is_one_line_error(tmp_path):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("pert\tn\nA\t3\n")
    with pytest.raises(StateError, match="lacks column"):
        infer_edits.read_tsv_requests(tsv)


def test_all_perts_min_and_max_cells():
    a = _adata()
    out = infer_edits.add_all_perts(a, ["A", "B", "C", "D"], pert_col="gene", control="ctl", seed=0,
                                    virtual_cells_per_pert=4)
    counts = out.obs["gene"].astype(str).value_counts()
    assert counts["C"] == 4 and counts["D"] == 4 and counts["A"] == 4
    assert any(n.endswith("__virt_C") for n in out.obs_names)
    padded = infer_edits.pad_min_cells(a, 5, pert_col="gene", control="ctl", seed=0)
    assert padded.obs["gene"].astype(str).value_counts()["B"] == 5
    capped = infer_edits.cap_max_cells(a, 1, pert_col="gene", control="ctl", seed=0)
    vc = capped.obs["gene"].astype(str).value_counts()
    assert vc["A"] == 1 and vc["B"] == 1 and vc["ctl"] == 1  # arc-state trims the controls too


def test_output_slots_follow_arc_state():
    a = _adata()
    preds = np.full((a.n_obs, 5), 20.0, dtype=np.float32)
    out = write_predictions(a.copy(), preds, None, embed_key=None, output_space="gene")
    assert np.asarray(out.X).max() == 14.0  # clipped to [0, 14]
    emb_preds = np.full((a.n_obs, 3), -1.0, dtype=np.float32)
    out = write_predictions(a.copy(), emb_preds, None, embed_key="X_emb", output_space="embedding")
    assert out.obsm["X_emb"].min() == -1.0  # embeddings are not clipped
    narrow = np.zeros((a.n_obs, 2), dtype=np.float32)
    out = write_predictions(a.copy(), narrow, np.ones((a.n_obs, 7), np.float32), embed_key="X_emb",
                            output_space="gene")
    assert "X_emb_pred" in out.obsm and out.obsm["X_hvg"].shape == (a.n_obs, 7)


def test_edit_pipeline_follows_the_spec_worked_example(tmp_path):
    """Spec addendum 1.6: --tsv T1:2,T2:1 --all-perts --virtual-cells-per-pert 2 --min-cells 3 --max-cells 4."""
    from state.io.columns import InputColumns

    labels = ["ctl", "A", "ctl", "A", "ctl", "B", "ctl", "B"]
    obs = pd.DataFrame({"gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(8)])
    a = ad.AnnData(X=sp.csr_matrix(np.arange(16, dtype=np.float32).reshape(8, 2)), obs=obs)
    a.layers["counts"] = a.X.copy()
    a.uns["note"] = "kept by --tsv, dropped by the concat of --all-perts"
    tsv = tmp_path / "req.tsv"
    tsv.write_text("perturbation\tnum_cells\nT1\t2\nT2\t1\n")
    edits = infer_edits.InputEdits(tsv=tsv, all_perts=True, virtual_cells_per_pert=2, min_cells=3, max_cells=4)
    roles = InputColumns(pert_col="gene", control="ctl", celltype_col=None, batch_col=None, embed_key=None)
    out = infer_edits.apply_edits(a, edits, roles, pert_names=["A", "B", "Z", "Y", "ctl"], seed=42)

    controls = np.array([0, 2, 4, 6])
    rng = np.random.RandomState(42)
    tsv_rows = controls[rng.randint(0, 4, 3)]  # choice(pool, k, replace=True)
    template = controls[np.random.RandomState(42).permutation(4)[:2]]  # choice(n, K, replace=False), drawn order
    names = [f"c{i}" for i in range(8)] + ["8", "9", "10"]
    names += [f"c{t}__virt_{p}" for p in ("Z", "Y") for t in template]
    # value_counts: ctl 4, A 2, B 2, T1 2, Z 2, Y 2, T2 1 -> every group below 3 gets clones, pad1.. in draw order
    pool = np.flatnonzero(np.array(labels + ["T1", "T1", "T2"] + ["Z", "Z", "Y", "Y"]) == "ctl")
    rng = np.random.RandomState(42)
    pool_names = np.array(names)[pool]
    for pert, count in pd.Series(labels + ["T1", "T1", "T2", "Z", "Z", "Y", "Y"]).value_counts().items():
        drawn = pool_names[rng.choice(pool.size, max(0, 3 - count), replace=True)]
        names += [f"{n}__virt_{pert}__pad{j}" for j, n in enumerate(drawn, start=1)]
    assert list(out.obs_names) == names  # nothing is above --max-cells 4 here
    assert out.obs["gene"].tolist()[8:11] == ["T1", "T1", "T2"]
    assert "note" not in out.uns and not out.layers  # --tsv drops layers, the concat of --all-perts drops uns
    tsv_only = infer_edits.pad_from_tsv(a, [("T1", 2), ("T2", 1)], pert_col="gene", control="ctl", seed=42)
    assert isinstance(tsv_only.X, np.ndarray) and tsv_only.uns["note"] and not tsv_only.layers  # X dense
    np.testing.assert_array_equal(tsv_only.X[8:], a.X.toarray()[tsv_rows])
    capped = infer_edits.cap_max_cells(out, 2, pert_col="gene", seed=42)
    rng = np.random.RandomState(43)  # seed + 1; labels visited sorted, control included
    kept = np.concatenate([rng.choice(np.flatnonzero(out.obs["gene"] == p), 2, replace=False)
                           if (out.obs["gene"] == p).sum() > 2 else np.flatnonzero(out.obs["gene"] == p)
                           for p in np.unique(out.obs["gene"])])
    assert list(capped.obs_names) == list(out.obs_names[np.sort(kept)])
    assert capped.obs["gene"].value_counts()["ctl"] == 2
