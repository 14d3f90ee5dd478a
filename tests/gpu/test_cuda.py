"""CUDA checks (opt in: `python -m pytest -m gpu`). Each compares a GPU run with a CPU reference."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from state.__main__ import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[2]
TX = ROOT / "tests" / "data" / "fixtures" / "tx"
SE = ROOT / "tests" / "data" / "fixtures" / "emb" / "se_tiny"


def test_infer_on_cuda_matches_arc_state(tmp_path):
    out = tmp_path / "out.h5ad"
    assert main(["tx", "infer", "--model-dir", str(TX / "state_llama" / "run"), "--adata",
                 str(TX / "state_llama" / "infer_input.h5ad"), "--pert-col", "gene", "--embed-key", "X_hvg",
                 "--output", str(out), "--quiet"]) == 0
    expected = ad.read_h5ad(TX / "state_llama" / "infer_expected.h5ad")
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_hvg"], expected.obsm["X_hvg"], atol=1e-4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_tx_train_on_cuda_and_load_on_cpu(tmp_path, monkeypatch, precision):
    from state.tx.models.registry import load_model_checkpoint

    monkeypatch.chdir(ROOT)
    assert main(["tx", "train", "+experiment=demo", "training.max_steps=4", "training.val_freq=2",
                 f"training.precision={precision}", f"output_dir={tmp_path}"]) == 0
    model = load_model_checkpoint(tmp_path / "demo" / "checkpoints" / "final.ckpt")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_emb_transform_on_cuda_is_close_to_cpu(tmp_path):
    out = tmp_path / "emb.h5ad"
    assert main(["emb", "transform", "--model-folder", str(SE / "model"), "--input", str(SE / "input_det.h5ad"),
                 "--output", str(out)]) == 0
    got = ad.read_h5ad(out).obsm["X_state"]
    ref = ad.read_h5ad(SE / "transform_det_expected.h5ad").obsm["X_state"]
    width = got.shape[1] - 10  # the L2-normalised cell part (bf16 on GPU, as arc-state)
    cos = (got[:, :width] * ref[:, :width]).sum(1)
    assert cos.min() > 0.99
