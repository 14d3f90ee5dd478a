"""Loading SE checkpoints: config sources, protein-embedding resolution, checkpoint choice, refusals."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from state.emb.checkpoint import load_se_model, resolve_checkpoint_path, resolve_protein_embeddings
from state.io.safe_load import safe_torch_load
from state.utils.errors import StateError

SE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "emb" / "se_tiny"
TX_RUN_FILES = ("var_dims.pkl", "data_module.torch")


def _expected_det(model) -> None:
    ref = np.load(SE / "expected_det.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(ref["sentence_ids"]), torch.from_numpy(ref["sentence_counts"]))
    np.testing.assert_allclose(out.numpy(), ref["X_state"], atol=1e-5, rtol=0)


def _save_variant(path: Path, *, keep_top_level: bool, cfg_in_hparams: bool) -> Path:
    ckpt = safe_torch_load(SE / "model" / "last.ckpt")
    new = {"state_dict": ckpt["state_dict"], "hyper_parameters": {"nhead": 4}}
    if cfg_in_hparams:  # a real pickled OmegaConf DictConfig, as old checkpoints hold
        new["hyper_parameters"]["cfg"] = OmegaConf.load(SE / "config.yaml")
    if keep_top_level:
        new["cfg_yaml"] = ckpt["cfg_yaml"]
        new["protein_embeds_dict"] = ckpt["protein_embeds_dict"]
    torch.save(new, path)
    return path


def test_config_from_pickled_omegaconf_in_hyper_parameters(tmp_path):
    path = _save_variant(tmp_path / "old.ckpt", keep_top_level=False, cfg_in_hparams=True)
    loaded = load_se_model(checkpoint=path, protein_embeddings=SE / "model" / "protein_embeddings.pt", device="cpu")
    assert loaded.pad_length == 64 and loaded.cls_token_idx == 3 and loaded.default_batch_size == 16
    _expected_det(loaded.model)


def test_missing_config_and_missing_genes_are_one_line_errors(tmp_path):
    path = _save_variant(tmp_path / "bare.ckpt", keep_top_level=False, cfg_in_hparams=False)
    with pytest.raises(StateError, match="holds no training config.*--config"):
        load_se_model(checkpoint=path, device="cpu")
    # config given, but nothing provides protein embeddings (config path points at a build machine)
    with pytest.raises(StateError, match="no protein embeddings found"):
        load_se_model(checkpoint=path, config=SE / "config.yaml", device="cpu")


def test_protein_embedding_resolution_order(tmp_path):
    ckpt = safe_torch_load(SE / "model" / "last.ckpt")
    cfg = OmegaConf.load(SE / "config.yaml")
    folder = tmp_path / "m"
    folder.mkdir()
    genes = dict(ckpt["protein_embeds_dict"])
    torch.save({"A": torch.zeros(32)}, folder / "protein_embeddings_a.pt")
    torch.save({"B": torch.zeros(32)}, folder / "protein_embeddings_b.pt")
    found, source = resolve_protein_embeddings(protein_embeddings=None, model_folder=folder, ckpt=ckpt, cfg=cfg)
    assert list(found) == ["B"] and source.endswith("protein_embeddings_b.pt")  # last in name order
    torch.save(genes, folder / "protein_embeddings.pt")
    found, source = resolve_protein_embeddings(protein_embeddings=None, model_folder=folder, ckpt=ckpt, cfg=cfg)
    assert source.endswith("protein_embeddings.pt") and len(found) == 200
    flag = tmp_path / "flag.pt"
    torch.save({"C": torch.zeros(32)}, flag)
    found, _ = resolve_protein_embeddings(protein_embeddings=flag, model_folder=folder, ckpt=ckpt, cfg=cfg)
    assert list(found) == ["C"]
    _, source = resolve_protein_embeddings(protein_embeddings=None, model_folder=None, ckpt=ckpt, cfg=cfg)
    assert source == "checkpoint protein_embeds_dict"
    cfg.embeddings.synth.all_embeddings = str(flag)
    _, source = resolve_protein_embeddings(protein_embeddings=None, model_folder=None, ckpt={}, cfg=cfg)
    assert source == str(flag)


def test_protein_embeddings_of_the_wrong_width_are_refused(tmp_path):
    bad = tmp_path / "pe.pt"
    torch.save({"SEG000": torch.zeros(7)}, bad)
    with pytest.raises(StateError, match=r"width \[7\], the checkpoint expects 32"):
        load_se_model(model_folder=SE / "model", protein_embeddings=bad, device="cpu")


def test_checkpoint_choice_is_deterministic_and_logged(tmp_path, caplog):
    for name in ("b.ckpt", "last.ckpt", "a.ckpt"):
        shutil.copy(SE / "model" / "last.ckpt", tmp_path / name)
    with caplog.at_level(logging.INFO):
        chosen = resolve_checkpoint_path(tmp_path, None)
    assert chosen.name == "last.ckpt" and "holds 3 checkpoints; using last.ckpt" in caplog.text
    assert resolve_checkpoint_path(tmp_path, tmp_path / "a.ckpt").name == "a.ckpt"  # --checkpoint wins
    with pytest.raises(StateError, match="no \\*.ckpt file"):
        resolve_checkpoint_path(_empty(tmp_path), None)
    with pytest.raises(StateError, match="no SE model given"):
        resolve_checkpoint_path(None, None)


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_tx_run_directory_and_tx_checkpoint_are_refused(tmp_path):
    run = tmp_path / "tx_run"
    (run / "checkpoints").mkdir(parents=True)
    for name in TX_RUN_FILES:
        (run / name).write_bytes(b"x")
    torch.save({"state_dict": {"pert_encoder.0.weight": torch.zeros(2, 2)}}, run / "checkpoints" / "final.ckpt")
    with pytest.raises(StateError, match="State Transition \\(tx\\) run directory"):
        load_se_model(model_folder=run, device="cpu")
    with pytest.raises(StateError, match="State Transition \\(tx\\) checkpoint"):
        load_se_model(checkpoint=run / "checkpoints" / "final.ckpt", device="cpu")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(StateError, match="does not look like an SE checkpoint"):
        load_se_model(checkpoint=other, device="cpu")
