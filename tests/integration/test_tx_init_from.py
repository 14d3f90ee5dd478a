"""``model.kwargs.init_from`` across vocabularies: rows of perturbations, genes and batches are mapped by
name (never by position), the rest start as a fresh model would, and an unmappable mismatch is one line."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from helpers.runs import TINY_STATE
from helpers.synthetic import make_processed_adata, write_toml
from state.io.safe_load import safe_torch_load
from state.tx import rundir
from state.tx.config.compose import compose_tx_config
from state.tx.train import run as tx_run
from state.tx.train.init_from import onehot_names
from state.tx.train.run import train
from state.utils.errors import StateError

FIXTURE_RUN = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx" / "state_llama"


def _write(adata: ad.AnnData, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.h5ad"
    adata.write_h5ad(path)
    return path


def _relabel(adata: ad.AnnData, *, perts: dict[str, str] | None = None, genes: dict[str, str] | None = None,
             reverse_genes: bool = False) -> ad.AnnData:
    """Rename perturbations / genes and optionally reverse the gene order (X_hvg rebuilt to match)."""
    adata = adata[:, ::-1].copy() if reverse_genes else adata.copy()
    if perts:
        adata.obs["gene"] = adata.obs["gene"].astype(str).replace(perts).astype("category")
    if genes:
        names = [genes.get(g, g) for g in adata.var_names.astype(str)]
        adata.var_names = names
        adata.var["gene_name"] = names
    hvg = adata.var["highly_variable"].to_numpy(bool)
    adata.obsm["X_hvg"] = np.asarray(adata.X[:, hvg].toarray(), dtype=np.float32)
    return adata


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    """Source and target screens: 3 perturbations shared, one renamed (shifting the one-hot order),
    two HVGs renamed and the gene order reversed (so positions never line up)."""
    root = tmp_path_factory.mktemp("init_from")
    source = make_processed_adata(n_cells=160, n_genes=30, n_perts=4, n_hvgs=12, seed=0)
    perts = sorted(set(source.obs["gene"].astype(str)) - {"non-targeting"})
    hvgs = list(source.var_names[source.var["highly_variable"].to_numpy(bool)].astype(str))
    target = _relabel(source, perts={perts[-1]: "AAA_NEW"}, genes={hvgs[0]: "NEWGENE1", hvgs[3]: "NEWGENE2"},
                      reverse_genes=True)
    out = {}
    for name, adata in (("source", source), ("target", target)):
        path = _write(adata, root / name)
        out[name] = write_toml(root / f"{name}.toml", dataset_name="synth", data_path=path, kind="fewshot")
    return out


def _args(toml: Path, out: Path, name: str, *more: str) -> list[str]:
    return [f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene",
            "data.kwargs.num_workers=0", "data.kwargs.control_pert=non-targeting", "use_wandb=false",
            f"output_dir={out}", f"name={name}", "training.max_steps=2", "training.val_freq=2",
            "training.batch_size=2", *TINY_STATE, "model.kwargs.batch_encoder=true", *more]


def _initial_state(monkeypatch, args: list[str]) -> tuple[dict[str, torch.Tensor], Path]:
    """The model's weights when fitting would start (after init_from), without fitting."""
    seen = {}

    def stop(plain, model, dm, plan, **_kw):
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["run"] = plan.path
        return None

    monkeypatch.setattr(tx_run, "_fit", stop)
    train(compose_tx_config(args))
    return seen["state"], seen["run"]


def _names(run: Path) -> dict[str, list[str]]:
    return {"perts": onehot_names(rundir.read_map(run, "perturbation")), "genes": rundir.read_genes(run),
            "batches": onehot_names(rundir.read_map(run, "batch"))}


@pytest.fixture(scope="module")
def source_run(screens, tmp_path_factory):
    result = train(compose_tx_config(_args(screens["source"], tmp_path_factory.mktemp("src"), "source")))
    return result.run_dir


def test_rows_are_mapped_by_name_and_the_rest_is_fresh(screens, source_run, tmp_path, monkeypatch, caplog):
    ckpt = source_run / "checkpoints" / "final.ckpt"
    source = safe_torch_load(ckpt)["state_dict"]
    with caplog.at_level(logging.INFO, logger="state"):
        mapped, run = _initial_state(monkeypatch, _args(screens["target"], tmp_path, "tuned",
                                                        f"model.kwargs.init_from={ckpt}"))
    fresh, _ = _initial_state(monkeypatch, _args(screens["target"], tmp_path, "fresh"))
    src, dst = _names(source_run), _names(run)
    assert len(src["perts"]) == len(dst["perts"]) and src["perts"] != dst["perts"]  # same count, other names
    assert len(src["genes"]) == len(dst["genes"]) and src["genes"] != dst["genes"]

    def check(key: str, dim: int, kind: str) -> tuple[int, int]:
        found = 0
        for i, name in enumerate(dst[kind]):
            got = mapped[key].select(dim, i)
            if name in src[kind]:
                found += 1
                torch.testing.assert_close(got, source[key].select(dim, src[kind].index(name)), rtol=0, atol=0)
            else:
                torch.testing.assert_close(got, fresh[key].select(dim, i), rtol=0, atol=0)
        return found, len(dst[kind])

    assert check("pert_encoder.0.weight", 1, "perts") == (4, 5)  # the control + 3 shared, AAA_NEW fresh
    n = len(dst["genes"])  # HVG ties may select a few more than 12; two of them renamed
    assert check("basal_encoder.0.weight", 1, "genes") == (n - 2, n)  # X_hvg features are genes
    assert check("project_out.0.weight", 0, "genes") == (n - 2, n)
    assert check("project_out.0.bias", 0, "genes") == (n - 2, n)
    assert check("gene_decoder.decoder.0.weight", 1, "genes") == (n - 2, n)
    assert check("gene_decoder.decoder.8.weight", 0, "genes") == (n - 2, n)
    assert check("gene_decoder.decoder.8.bias", 0, "genes") == (n - 2, n)
    assert check("batch_encoder.weight", 0, "batches") == (3, 3)
    for key in ("transformer_backbone.layers.0.self_attn.q_proj.weight", "pert_encoder.0.bias",
                "gene_decoder.decoder.4.weight"):
        torch.testing.assert_close(mapped[key], source[key], rtol=0, atol=0)
    table = caplog.text
    assert "perturbations mapped" in table and "4 of 5" in table and f"{n - 2} of {n}" in table
    assert "tensors new (fresh init)" in table and "by position" not in table


def test_arc_state_checkpoint_maps_by_name(tmp_path, monkeypatch, caplog):
    """arc-state 0.11.1's run directory (pert_onehot_map.pt, var_dims.pkl, batch_onehot_map.torch): one
    perturbation dropped, one renamed; everything arc-state knew keeps its row."""
    data = FIXTURE_RUN / "data" / "processed" / "synth.h5ad"
    if not data.is_file():
        pytest.skip("tx/state_llama fixture data not copied")
    adata = ad.read_h5ad(data)
    adata = adata[adata.obs["gene"].astype(str) != "TXG0123"].copy()
    adata.obs["gene"] = adata.obs["gene"].astype(str).replace({"TXG0023": "AAA_NEW"}).astype("category")
    toml = write_toml(tmp_path / "t.toml", dataset_name="synth", data_path=_write(adata, tmp_path / "d"),
                      kind="fewshot")
    ckpt = FIXTURE_RUN / "run" / "checkpoints" / "final.ckpt"
    args = [*_args(toml, tmp_path, "arc", f"model.kwargs.init_from={ckpt}", "data.kwargs.batch_col=gem_group"),
            "model.kwargs.cell_set_len=16"]
    with caplog.at_level(logging.INFO, logger="state"):
        mapped, run = _initial_state(monkeypatch, args)
    source = safe_torch_load(ckpt)["state_dict"]
    src, dst = _names(FIXTURE_RUN / "run"), _names(run)
    assert len(dst["perts"]) == len(src["perts"]) - 1
    for i, name in enumerate(dst["perts"]):
        if name in src["perts"]:
            torch.testing.assert_close(mapped["pert_encoder.0.weight"][:, i],
                                       source["pert_encoder.0.weight"][:, src["perts"].index(name)], rtol=0, atol=0)
    assert "AAA_NEW" in dst["perts"] and "7 of 8" in caplog.text and "64 of 64" in caplog.text
    torch.testing.assert_close(mapped["gene_decoder.decoder.8.weight"], source["gene_decoder.decoder.8.weight"])


def test_a_different_hidden_size_is_one_line(screens, source_run, tmp_path, monkeypatch):
    ckpt = source_run / "checkpoints" / "final.ckpt"
    args = [*_args(screens["target"], tmp_path, "wide", f"model.kwargs.init_from={ckpt}"),
            "model.kwargs.hidden_dim=64", "model.kwargs.transformer_backbone_kwargs.head_dim=16"]
    with pytest.raises(StateError, match=r"init_from=.*: \S+ has shape \(\d+, \d+\) there but \(\d+, \d+\) in "
                                         r"this model") as info:
        _initial_state(monkeypatch, args)
    assert "\n" not in str(info.value)


def test_another_backbone_is_one_line(screens, source_run, tmp_path, monkeypatch):
    ckpt = source_run / "checkpoints" / "final.ckpt"
    args = [f"data.kwargs.toml_config_path={screens['target']}", "data.kwargs.embed_key=X_hvg",
            "data.kwargs.output_space=gene", "data.kwargs.num_workers=0", "data.kwargs.control_pert=non-targeting",
            "use_wandb=false", f"output_dir={tmp_path}", "name=gpt2", "training.batch_size=2", "model=pertsets",
            "model.kwargs.cell_set_len=8", "model.kwargs.hidden_dim=32", "model.kwargs.transformer_backbone_kwargs.n_layer=1",
            "model.kwargs.transformer_backbone_kwargs.n_head=4", f"model.kwargs.init_from={ckpt}"]
    with pytest.raises(StateError, match=r"its backbone is not this model's \(transformer_backbone\.\S+ there, "
                                         r"transformer_backbone\.\S+ here\)"):
        _initial_state(monkeypatch, args)


def test_lora_run_starts_from_a_plain_checkpoint(screens, source_run, tmp_path, monkeypatch):
    ckpt = source_run / "checkpoints" / "final.ckpt"
    source = safe_torch_load(ckpt)["state_dict"]
    mapped, _ = _initial_state(monkeypatch, _args(screens["target"], tmp_path, "lora", f"model.kwargs.init_from={ckpt}",
                                                  "model.kwargs.lora.enable=true"))
    wrapped = [k for k in mapped if ".base_layer." in k]
    assert wrapped
    for key in wrapped:  # the frozen base weights are the checkpoint's; the adapters start fresh
        plain = key.replace("base_model.model.", "").replace(".base_layer.", ".")
        torch.testing.assert_close(mapped[key], source[plain], rtol=0, atol=0)
