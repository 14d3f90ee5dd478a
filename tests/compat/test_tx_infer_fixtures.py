"""`state tx infer` on run directories written by arc-state 0.11.1 reproduces its outputs."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from state.__main__ import main
from state.io.safe_load import safe_torch_load
from state.tx.infer.simulate import plan_windows

FIX = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx"
INPUT = FIX / "state_llama" / "infer_input.h5ad"


def _infer(tmp_path: Path, model: str, *extra: str, output: str = "out.h5ad") -> Path:
    out = tmp_path / output
    argv = ["tx", "infer", "--model-dir", str(FIX / model / "run"), "--adata", str(INPUT), "--pert-col", "gene",
            "--embed-key", "X_hvg", "--output", str(out), "--seed", "42", "--quiet", "--unknown-as-control", *extra]
    assert main(argv) == 0
    return out


@pytest.mark.parametrize("model", ["state_llama", "state_gpt2"])
def test_infer_matches_arc_state_output(tmp_path, model):
    got = ad.read_h5ad(_infer(tmp_path, model))
    expected = ad.read_h5ad(FIX / model / "infer_expected.h5ad")
    np.testing.assert_allclose(got.obsm["X_hvg"], expected.obsm["X_hvg"], atol=1e-5, rtol=1e-5)
    assert list(got.obs_names) == list(expected.obs_names)
    assert (got.X != expected.X).nnz == 0  # X is left untouched when an embed key is used
    assert got.obs.equals(expected.obs)


def test_window_plan_replays_arc_state_trace():
    trace = np.load(FIX / "state_llama" / "infer_trace.npz")
    adata = ad.read_h5ad(INPUT)
    windows, _ = plan_windows(adata.obs["gene"].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy(),
                              control="non-targeting", set_len=16, seed=42)
    assert len(windows) == trace["call_group"].size
    np.testing.assert_array_equal(np.concatenate([w.rows for w in windows]), trace["call_rows"])
    np.testing.assert_array_equal(np.concatenate([w.basal for w in windows]), trace["call_ctrl_rows"])


def test_perturb_mean_baseline_infers(tmp_path):
    # arc-state 0.11.1 cannot infer with mean baselines; ours predicts control + per-perturbation offset.
    got = ad.read_h5ad(_infer(tmp_path, "perturb_mean"))
    trace = np.load(FIX / "state_llama" / "infer_trace.npz")
    offsets = safe_torch_load(FIX / "perturb_mean" / "run" / "checkpoints" / "final.ckpt")["pert_mean_offsets"]
    source = ad.read_h5ad(INPUT)
    labels = source.obs["gene"].astype(str).to_numpy()
    for row, ctrl in zip(trace["call_rows"], trace["call_ctrl_rows"], strict=True):
        offset = np.asarray(offsets.get(labels[row], 0.0), dtype=np.float32)
        expected = np.clip(source.obsm["X_hvg"][ctrl] + offset, 0, 14)
        np.testing.assert_allclose(got.obsm["X_hvg"][row], expected, atol=1e-5)


def test_infer_is_deterministic_and_npy_matches(tmp_path):
    first = ad.read_h5ad(_infer(tmp_path, "state_llama", output="a.h5ad")).obsm["X_hvg"]
    second = ad.read_h5ad(_infer(tmp_path, "state_llama", output="b.h5ad")).obsm["X_hvg"]
    assert np.array_equal(first, second)
    npy = np.load(_infer(tmp_path, "state_llama", output="c.npy"))
    assert np.array_equal(npy, first)
    other_seed = ad.read_h5ad(_infer(tmp_path, "state_llama", "--seed", "7", output="d.h5ad")).obsm["X_hvg"]
    assert not np.array_equal(first, other_seed)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pert-col", "nope"], "--pert-col 'nope'"),
        (["--control-pert", "ABSENT"], "control label 'ABSENT'"),
        (["--embed-key", "X_missing"], "obsm['X_missing']"),
        (["--celltype-col", "nope"], "--celltype-col 'nope'"),
        (["--output", "out.txt"], "must end in .h5ad or .npy"),
    ],
)
def test_infer_bad_input_is_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out.h5ad"
    base = {"--model-dir": str(FIX / "state_llama" / "run"), "--adata": str(INPUT), "--pert-col": "gene",
            "--embed-key": "X_hvg", "--output": str(out)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = str(tmp_path / value) if flag == "--output" else value
    argv = ["tx", "infer", *[x for kv in base.items() for x in kv], "--unknown-as-control"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not list(tmp_path.iterdir())


def test_infer_refuses_width_mismatch(tmp_path, capsys):
    # .X has 256 genes, the model was trained on 64-d X_hvg: say so instead of a shape error.
    out = tmp_path / "o.h5ad"
    rc = main(["tx", "infer", "--model-dir", str(FIX / "state_llama" / "run"), "--adata", str(INPUT),
               "--pert-col", "gene", "--output", str(out), "--unknown-as-control"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "256 columns but the model expects 64" in err and "--embed-key X_hvg" in err
    assert not out.exists()


def test_forward_batching_never_changes_results():
    """Windows are stacked into forward passes; how many per pass must not change a single bit."""
    from state.tx.infer.predictor import load_predictor
    from state.tx.infer.simulate import feature_reader, simulate

    predictor = load_predictor(FIX / "state_llama" / "run")
    adata = ad.read_h5ad(INPUT)
    labels = adata.obs["gene"].astype(str).to_numpy()
    windows, _ = plan_windows(labels, adata.obs["cell_type"].astype(str).to_numpy(), control="non-targeting",
                              set_len=16, seed=42)
    read, _ = feature_reader(adata, "X_hvg")
    batch = predictor.batch_indices(adata.obs["gem_group"].astype(str).to_numpy())
    runs = [
        simulate(predictor, windows, read, n_cells=adata.n_obs, pert_vectors=predictor.pert_vector,
                 batch_index=batch, max_cells_per_call=cells, quiet=True).preds
        for cells in (1, 48, 4096)
    ]
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])


def test_preprocess_infer_template_feeds_infer(tmp_path):
    template = tmp_path / "template.h5ad"
    assert main(["tx", "preprocess_infer", "--adata", str(INPUT), "--output", str(template),
                 "--control_condition", "non-targeting", "--pert_col", "gene", "--seed", "1"]) == 0
    out = tmp_path / "sim.h5ad"
    assert main(["tx", "infer", "--model-dir", str(FIX / "state_llama" / "run"), "--adata", str(template),
                 "--pert-col", "gene", "--embed-key", "X_hvg", "--output", str(out), "--quiet",
                 "--unknown-as-control"]) == 0
    sim, src = ad.read_h5ad(out), ad.read_h5ad(template)
    assert sim.obs.equals(src.obs)
    assert sim.obsm["X_hvg"].shape == src.obsm["X_hvg"].shape
    assert not np.array_equal(sim.obsm["X_hvg"], src.obsm["X_hvg"])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_unknown_perturbations_are_refused_by_default(tmp_path, capsys):
    out = tmp_path / "o.h5ad"
    assert main(["tx", "infer", "--model-dir", str(FIX / "state_llama" / "run"), "--adata", str(INPUT),
                 "--pert-col", "gene", "--embed-key", "X_hvg", "--output", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "1 perturbation(s)" in line and "TXG_UNSEEN" in line and "--unknown-as-control" in line
    assert not out.exists()


def test_cell_type_without_controls_is_refused(tmp_path, capsys):
    adata = ad.read_h5ad(INPUT)
    keep = ~((adata.obs["cell_type"] == "ctA") & (adata.obs["gene"] == "non-targeting")).to_numpy()
    path = tmp_path / "no_ctA_controls.h5ad"
    adata[keep].copy().write_h5ad(path)
    out = tmp_path / "o.h5ad"
    assert main(["tx", "infer", "--model-dir", str(FIX / "state_llama" / "run"), "--adata", str(path),
                 "--pert-col", "gene", "--embed-key", "X_hvg", "--output", str(out), "--unknown-as-control"]) == 2
    line = _one_line_error(capsys)
    assert "ctA" in line and "--celltypes" in line and not out.exists()


@pytest.mark.parametrize("missing", ["var_dims.pkl", "pert_onehot_map.pt", "config.yaml"])
def test_run_dir_missing_a_file_names_it(tmp_path, capsys, missing):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(FIX / "state_llama" / "run", run)
    (run / missing).unlink()
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(INPUT), "--pert-col", "gene",
                 "--embed-key", "X_hvg", "--output", str(tmp_path / "o.h5ad")]) == 2
    assert missing in _one_line_error(capsys)


def test_se_model_passed_as_run_dir_says_so(tmp_path, capsys):
    se_folder = FIX.parent / "emb" / "se_tiny" / "model"
    assert main(["tx", "infer", "--model-dir", str(se_folder), "--adata", str(INPUT), "--pert-col", "gene",
                 "--output", str(tmp_path / "o.h5ad")]) == 2
    assert "State Embedding (SE) model folder" in _one_line_error(capsys)
    assert main(["tx", "predict", "--output-dir", str(se_folder)]) == 2
    assert "State Embedding (SE) model folder" in _one_line_error(capsys)
    assert main(["tx", "infer", "--model-dir", str(FIX / "state_llama" / "run"), "--checkpoint",
                 str(se_folder / "last.ckpt"), "--adata", str(INPUT), "--pert-col", "gene", "--embed-key", "X_hvg",
                 "--output", str(tmp_path / "o.h5ad")]) == 2
    assert "State Embedding (SE) checkpoint" in _one_line_error(capsys)


def test_output_equal_to_input_and_negative_tsv_counts(tmp_path, capsys):
    import shutil

    copy = tmp_path / "in.h5ad"
    shutil.copy(INPUT, copy)
    assert main(["tx", "infer", "--model-dir", str(FIX / "state_llama" / "run"), "--adata", str(copy),
                 "--pert-col", "gene", "--embed-key", "X_hvg", "--output", str(copy)]) == 2
    assert "is the input file" in _one_line_error(capsys)
    tsv = tmp_path / "req.tsv"
    tsv.write_text("perturbation\tnum_cells\nTXG0057\t-3\n")
    out = tmp_path / "o.h5ad"
    assert main(["tx", "infer", "--model-dir", str(FIX / "state_llama" / "run"), "--adata", str(INPUT),
                 "--pert-col", "gene", "--embed-key", "X_hvg", "--output", str(out), "--tsv", str(tsv)]) == 2
    assert "non-negative" in _one_line_error(capsys) and not out.exists()


def test_genes_are_aligned_to_the_model_or_refused(tmp_path, capsys):
    from state.tx.infer.predictor import load_predictor

    predictor = load_predictor(FIX / "state_llama" / "run")
    genes = [f"G{i}" for i in range(6)]
    predictor.genes, predictor.input_dim, predictor.model_embed_key = genes, 6, None  # a model trained on .X
    shuffled = ad.AnnData(X=np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::-1].copy(),
                          var=__import__("pandas").DataFrame(index=genes[::-1]))
    aligned = predictor.align_genes(shuffled)
    assert list(aligned.var_names) == genes
    np.testing.assert_array_equal(aligned.X, np.arange(24, dtype=np.float32).reshape(4, 6))
    with pytest.raises(Exception, match="2 of the model's 6 genes are missing"):
        predictor.align_genes(shuffled[:, 2:].copy())


@pytest.fixture(scope="module")
def run_with_best(tmp_path_factory) -> Path:
    """The llama run plus a checkpoints/best.ckpt whose weights differ from final.ckpt."""
    import shutil

    import torch

    run = tmp_path_factory.mktemp("best") / "run"
    shutil.copytree(FIX / "state_llama" / "run", run)
    ckpt = torch.load(run / "checkpoints" / "final.ckpt", weights_only=False)
    key = next(k for k in ckpt["state_dict"] if k.startswith("pert_encoder.") and k.endswith("weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] * 1.5
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    return run


def test_infer_checkpoint_by_name_equals_api_and_path(tmp_path, run_with_best):
    from state import api

    outputs = {}
    for label, checkpoint in [("name", "best"), ("file", "best.ckpt"),
                              ("path", str(run_with_best / "checkpoints" / "best.ckpt")), ("default", None)]:
        out = tmp_path / f"{label}.h5ad"
        extra = [] if checkpoint is None else ["--checkpoint", checkpoint]
        assert main(["tx", "infer", "--model-dir", str(run_with_best), "--adata", str(INPUT), "--pert-col", "gene",
                     "--embed-key", "X_hvg", "--output", str(out), "--quiet", "--unknown-as-control", *extra]) == 0
        outputs[label] = ad.read_h5ad(out).obsm["X_hvg"]
    assert np.array_equal(outputs["name"], outputs["file"]) and np.array_equal(outputs["name"], outputs["path"])
    assert not np.allclose(outputs["name"], outputs["default"])  # default is final.ckpt, not best
    run = api.load_run(run_with_best, checkpoint="best")
    assert run.checkpoint == run_with_best / "checkpoints" / "best.ckpt"
    cells = ad.read_h5ad(INPUT)
    via_api = run.predict(cells, pert_col="gene", seed=42, unknown_as_control=True)
    np.testing.assert_array_equal(via_api.obsm["X_hvg"], outputs["name"])


def test_infer_unknown_checkpoint_names_run_and_lists_present(tmp_path, capsys, run_with_best):
    out = tmp_path / "o.h5ad"
    assert main(["tx", "infer", "--model-dir", str(run_with_best), "--adata", str(INPUT), "--pert-col", "gene",
                 "--embed-key", "X_hvg", "--output", str(out), "--checkpoint", "last"]) == 2
    err = _one_line_error(capsys)
    assert str(run_with_best / "checkpoints" / "last.ckpt") in err and "(available: best.ckpt, final.ckpt)" in err
    assert not out.exists()
