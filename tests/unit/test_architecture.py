"""TransitionConfig and the one set-length rule: config -> model kwargs -> saved hparams agree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from state.tx.checkpoint import read_checkpoint
from state.tx.config.architecture import (
    WINDOW_DEFAULT_SET_LEN,
    TransitionConfig,
    cells_per_set,
    model_set_length,
    trained_set_length,
)
from state.tx.config.compose import compose_tx_config, config_groups
from state.tx.models.entries import model_entry

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx"
VAR_DIMS = {"input_dim": 16, "output_dim": 16, "pert_dim": 5, "batch_dim": 2, "hvg_dim": 16, "gene_dim": 40}


def test_config_rule_takes_the_first_value_given_in_arc_state_order():
    kwargs = {"cell_set_len": 5, "cell_sentence_len": 7,
              "transformer_backbone_kwargs": {"max_position_embeddings": 4, "n_positions": 3}}
    assert cells_per_set(kwargs, top_level=9) == 9
    assert cells_per_set(kwargs, one_set_per_batch=True) == 7
    assert cells_per_set(kwargs) == 3  # cell_sentence_len is only read for one-set models
    del kwargs["transformer_backbone_kwargs"]["n_positions"]
    assert cells_per_set(kwargs) == 4
    del kwargs["transformer_backbone_kwargs"]
    assert cells_per_set(kwargs) == 5
    assert cells_per_set({}) is None


def test_saved_rule_reads_only_the_key_train_wrote_back():
    hparams = {"cell_set_len": 6, "cell_sentence_len": 512, "transformer_backbone_kwargs": {"n_positions": 7}}
    assert cells_per_set(hparams, saved=True) == 6
    assert cells_per_set(hparams, one_set_per_batch=True, saved=True) == 512
    assert cells_per_set({"transformer_backbone_kwargs": {"n_positions": 7}}, saved=True) is None


@pytest.mark.parametrize("choice", config_groups()["model"])
def test_every_model_config_round_trips_through_its_saved_hparams(choice):
    weights = ["model.kwargs.pretrained_path=/weights"] if choice.startswith("scgpt") else []  # a ??? value
    model_cfg = compose_tx_config([f"model={choice}", *weights]).model
    arch = TransitionConfig.from_model_config(model_cfg, var_dims=VAR_DIMS, output_space="gene")
    entry = model_entry(model_cfg.name)
    assert arch.set_len == model_set_length(model_cfg) and arch.one_set_per_batch == entry.one_set_per_batch
    kwargs = arch.model_kwargs(model_cfg.kwargs)
    saved = {**kwargs, "transformer_backbone_kwargs": arch.backbone_hparams()}
    again = TransitionConfig.from_hparams(saved, one_set_per_batch=entry.one_set_per_batch)
    assert (again.set_len, again.n_positions) == (arch.set_len, arch.set_len + arch.extra_tokens)
    assert list(kwargs)[: len(model_cfg.kwargs)] == list(model_cfg.kwargs)  # arc-state's key order kept
    assert kwargs["decoder_cfg"]["gene_dim"] == VAR_DIMS["hvg_dim"]


def test_model_kwargs_honour_an_n_positions_override():
    model_cfg = compose_tx_config(["model=pertsets", "model.kwargs.cell_set_len=16",
                                   "model.kwargs.transformer_backbone_kwargs.n_positions=6"]).model
    arch = TransitionConfig.from_model_config(model_cfg, var_dims=VAR_DIMS, output_space="embedding")
    kwargs = arch.model_kwargs(model_cfg.kwargs)
    assert (kwargs["cell_set_len"], arch.backbone_hparams()["n_positions"]) == (6, 7)  # extra_tokens 1
    assert kwargs["gene_decoder_bool"] is False and "decoder_cfg" not in kwargs
    assert list(arch.backbone_hparams()) == list(model_cfg.kwargs.transformer_backbone_kwargs)  # in place


@pytest.mark.parametrize(("name", "positions"), [("state_llama", 16), ("state_gpt2", 17), ("perturb_mean", 16)])
def test_arc_state_checkpoints_read_back_their_architecture(name, positions):
    hparams = read_checkpoint(FIXTURES / name / "run" / "checkpoints" / "final.ckpt")["hyper_parameters"]
    arch = TransitionConfig.from_hparams(hparams)
    assert (arch.set_len, arch.n_positions) == (16, positions)
    assert (arch.input_dim, arch.hidden_dim) == (hparams["input_dim"], hparams["hidden_dim"])
    if name != "perturb_mean":  # the mean baselines never added n_positions to their backbone kwargs
        assert list(arch.backbone_hparams().items()) == list(hparams["transformer_backbone_kwargs"].items())


def test_config_is_frozen_and_read_only():
    arch = TransitionConfig(set_len=4, backbone_kwargs={"n_head": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.set_len = 5
    with pytest.raises(TypeError):
        arch.backbone_kwargs["n_head"] = 3
    assert arch.backbone_hparams() == {"n_head": 2, "n_positions": 4}


def test_trained_set_length_follows_the_model_kind_then_the_run_config():
    assert trained_set_length({"cell_set_len": 8}) == 8
    cpa = {"name": "cpa", "kwargs": {"cell_sentence_len": 32}}
    assert trained_set_length({"cell_sentence_len": 32}, cpa) == 32
    assert trained_set_length({}, cpa) == 32
    assert trained_set_length({}, {"name": "state", "kwargs": {"cell_set_len": 12}}) == 12
    assert trained_set_length({}) == WINDOW_DEFAULT_SET_LEN


def test_one_set_models_train_one_set_per_step():
    assert model_entry("cpa").sets_per_batch(16, 8) == 1
    assert model_entry("scGPT-genetic").sets_per_batch(16, 8) == 1
    assert model_entry("state").sets_per_batch(16, 8) == 16
    assert model_entry("scvi").sets_per_batch(16, 1) == 16  # a one-cell set: nothing to force
