"""The Python API end to end, as docs/python_api.md shows it: train on the bundled example, load the
run, simulate perturbations, fit a head, write screen statistics; then the same run through the CLI."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from helpers.markdown_runner import run_page
from state import api
from state.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """Run every block of docs/python_api.md in a fresh directory that sees examples/."""
    work = tmp_path_factory.mktemp("api")
    (work / "examples").symlink_to(ROOT / "examples")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        namespace = run_page(ROOT / "docs" / "python_api.md")
    return work, namespace


def test_documented_session_trains_and_simulates(page):
    work, ns = page
    result = ns["result"]
    assert result.run_dir == Path("runs/api_demo") and result.global_step == 6
    assert set(result.checkpoint_paths) == {"best.ckpt", "last.ckpt", "final.ckpt"}
    assert np.isfinite(result.metrics["val_loss"])
    simulated, controls = ns["simulated"], ns["controls"]
    counts = simulated.obs["gene"].astype(str).value_counts()
    assert counts["JUN"] == 50 and counts["STAT3"] == 30 and counts["non-targeting"] == controls.n_obs
    hvg = simulated.obsm["X_hvg"]
    assert hvg.shape == (controls.n_obs + 80, 64) and np.isfinite(hvg).all() and hvg.min() >= 0 and hvg.max() <= 14
    # the input's rows come first, simulated by the model (not copied through), and the input is untouched
    assert list(simulated.obs_names[: controls.n_obs]) == list(controls.obs_names)
    assert not np.allclose(hvg[: controls.n_obs], controls.obsm["X_hvg"])
    assert np.array_equal(controls.obsm["X_hvg"], ns["cells"][controls.obs_names].obsm["X_hvg"])
    assert ns["accuracy"] > 0.9
    for name in ("perturbation_summary.csv", "top_delta_heatmap.png"):
        assert (work / "runs" / "example_stats" / name).is_file()


def test_api_run_equals_cli_infer(page, tmp_path):
    work, ns = page
    run_dir = work / "runs" / "api_demo"
    cells = ns["cells"]
    subset = cells[cells.obs["cell_type"] == "K562"].copy()
    subset.write_h5ad(tmp_path / "k562.h5ad")
    assert main(["tx", "infer", "--model-dir", str(run_dir), "--adata", str(tmp_path / "k562.h5ad"),
                 "--pert-col", "gene", "--embed-key", "X_hvg", "--seed", "11", "--output",
                 str(tmp_path / "cli.h5ad"), "--quiet"]) == 0
    cli = ad.read_h5ad(tmp_path / "cli.h5ad")
    run = api.load_run(run_dir)  # final.ckpt, as infer's default
    out = run.predict(subset, pert_col="gene", seed=11)
    np.testing.assert_array_equal(out.obsm["X_hvg"], cli.obsm["X_hvg"])
    assert not np.array_equal(out.obsm["X_hvg"], subset.obsm["X_hvg"])


def test_train_resumes_from_a_saved_config(page):
    work, ns = page
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        again = api.train("runs/api_demo/config.yaml", overrides={"training.max_steps": 7})
    assert again.resumed_from == Path("runs/api_demo/checkpoints/last.ckpt") and again.global_step == 7
