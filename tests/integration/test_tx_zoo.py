"""The tx model zoo end to end on CPU: every model config trains a few steps, then `state tx predict
--predict-only` and `state tx infer` run on the run directory it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from helpers.synthetic import make_processed_dataset, write_toml
from state.__main__ import main
from state.io.safe_load import safe_torch_load
from state.tx.models.registry import MODEL_NAME_KEY, load_model_checkpoint

SMALL_GPT2 = ["model.kwargs.transformer_backbone_kwargs.n_layer=1", "model.kwargs.transformer_backbone_kwargs.n_head=2"]
SMALL_LLAMA = [f"model.kwargs.transformer_backbone_kwargs.{k}={v}" for k, v in
               {"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 2, "head_dim": 8}.items()]
SMALL_AUTOENCODER = ["model.kwargs.cell_sentence_len=8", "model.kwargs.n_latent=8",
                     "model.kwargs.n_hidden_encoder=16", "model.kwargs.n_layers_encoder=2",
                     "model.kwargs.n_hidden_decoder=16", "model.kwargs.n_layers_decoder=2"]
SMALL_SCGPT = ["model.kwargs.cell_sentence_len=8", "model.kwargs.embsize=16", "model.kwargs.d_hid=16",
               "model.kwargs.nlayers=1", "model.kwargs.nhead=2", "model.kwargs.pretrained_path=null",
               "training.precision=32-true"]

# metrics.csv columns each model must log beyond train_loss / val_loss
EXTRA_METRICS = {"cpa": {"train/adv_loss", "train/adv_penalty", "train/adv_weight", "train/recon_loss"},
                 "scvi": {"train/kl_loss", "train/kl_weight"}, "decoder_only": {"decoder_loss"}}
# config file -> (canonical registry name, model overrides, data overrides)
ZOO = {
    "embedsum": ("embedsum", ["model.kwargs.cell_set_len=8", "model.kwargs.hidden_dim=16"], {}),
    "decoder_only": ("decoder_only", ["model.kwargs.cell_set_len=8", "model.kwargs.hidden_dim=16", *SMALL_GPT2],
                     {"data.kwargs.embed_key": "X_emb"}),
    "pseudobulk": ("pseudobulk", ["model.kwargs.cell_set_len=8", "model.kwargs.hidden_dim=16", *SMALL_LLAMA], {}),
    "old_neuralot": ("old_neuralot", ["model.kwargs.cell_set_len=8", "model.kwargs.hidden_dim=16", *SMALL_GPT2], {}),
    "cpa": ("cpa", [*SMALL_AUTOENCODER, "model.kwargs.n_hidden_adv=8", "model.kwargs.n_layers_adv=2",
                    "training=cpa", "training.n_steps_pretrain_ae=1", "training.n_steps_adv_warmup=2",
                    "training.adv_steps=1", "training.do_clip_grad=true"], {}),
    "scvi": ("scvi", [*SMALL_AUTOENCODER, "training=scvi", "training.n_epochs_kl_warmup=2"], {}),
    "scgpt-genetic": ("scgpt-genetic", [*SMALL_SCGPT, "training=scgpt"], {}),
    "scgpt-chemical": ("scgpt-chemical", [*SMALL_SCGPT, "training=scgpt", "+model.kwargs.input_emb_style=category",
                                          "+model.kwargs.n_input_bins=5"], {}),
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    data = make_processed_dataset(root / "data", n_cells=160, n_genes=30, n_hvgs=12, n_perts=3, embed_dim=8,
                                  n_batches=2, seed=1)
    toml = write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")
    return {"data": data, "toml": toml}


def _train(synth, out: Path, config: str, model_overrides: list[str], data_overrides: dict[str, str]) -> Path:
    data = {"toml_config_path": str(synth["toml"]), "embed_key": "X_hvg", "output_space": "gene",
            "num_workers": "0", "control_pert": "non-targeting", **{k.split(".")[-1]: v for k, v in
                                                                   data_overrides.items()}}
    args = [f"data.kwargs.{k}={v}" for k, v in data.items()]
    args += [f"model={config}", "+model.kwargs.decoder_hidden_dims=[16]", "use_wandb=false", f"output_dir={out}",
             "name=run", "training.max_steps=4", "training.val_freq=2", "training.batch_size=2",
             "+training.log_every_n_steps=1", *model_overrides]
    assert main(["tx", "train", *args]) == 0
    return out / "run"


@pytest.mark.parametrize("config", list(ZOO))
def test_zoo_model_trains_predicts_and_infers(config, synth, tmp_path):
    canonical, model_overrides, data_overrides = ZOO[config]
    run = _train(synth, tmp_path, config, model_overrides, data_overrides)
    final = run / "checkpoints" / "final.ckpt"
    for name in ("config.yaml", "var_dims.pkl", "pert_onehot_map.pt", "checkpoints/last.ckpt", "version_0/metrics.csv"):
        assert (run / name).is_file(), name
    ckpt = safe_torch_load(final)
    assert ckpt[MODEL_NAME_KEY] == canonical and ckpt["global_step"] == 4
    columns = set((run / "version_0" / "metrics.csv").read_text().splitlines()[0].split(","))
    assert {"val_loss", "train_loss", *EXTRA_METRICS.get(config, ())} <= columns
    if canonical in ("cpa", "scvi") or canonical.startswith("scgpt"):  # one set of cell_sentence_len per step
        assert ckpt["hyper_parameters"]["batch_size"] == 1
    module = load_model_checkpoint(final)  # class found from the checkpoint alone
    assert module.zoo_name == canonical

    assert main(["tx", "predict", "--output-dir", str(run), "--checkpoint", "final.ckpt", "--predict-only"]) == 0
    pred = ad.read_h5ad(run / "eval_final.ckpt" / "adata_pred.h5ad")
    real = ad.read_h5ad(run / "eval_final.ckpt" / "adata_real.h5ad")
    assert pred.n_obs == real.n_obs > 0 and np.isfinite(np.asarray(pred.X)).all()

    embed_key = data_overrides.get("data.kwargs.embed_key", "X_hvg")
    out = tmp_path / "simulated.h5ad"
    assert main(["tx", "infer", "--model-dir", str(run), "--adata", str(synth["data"]), "--embed-key", embed_key,
                 "--pert-col", "gene", "--output", str(out), "--quiet"]) == 0
    source, simulated = ad.read_h5ad(synth["data"]), ad.read_h5ad(out)
    assert simulated.n_obs == source.n_obs
    values = np.asarray(simulated.obsm[embed_key])
    assert values.shape == source.obsm[embed_key].shape and np.isfinite(values).all()
    if canonical != "decoder_only":  # decoder_only passes the latent through by design
        assert not np.allclose(values, source.obsm[embed_key])


# ------------------------------------------------------------------ parts


def test_count_likelihoods_match_torch_distributions():
    from state.tx.nn.distributions import nb_log_prob, zinb_log_prob

    x = torch.tensor([[0.0, 1.0, 4.0, 9.0]])
    mu, theta = torch.tensor([[0.5, 2.0, 3.0, 8.0]]), torch.tensor([[1.5, 0.7, 4.0, 2.0]])
    reference = torch.distributions.NegativeBinomial(total_count=theta, logits=mu.log() - theta.log()).log_prob(x)
    torch.testing.assert_close(nb_log_prob(x, mu, theta), reference, atol=1e-4, rtol=1e-4)
    never_inflated = zinb_log_prob(x, mu, theta, torch.full_like(x, -30.0))
    torch.testing.assert_close(never_inflated, reference, atol=1e-4, rtol=1e-4)
    inflated = zinb_log_prob(x, mu, theta, torch.zeros_like(x))  # pi = 0.5: more mass at 0, less elsewhere
    assert inflated[0, 0] > reference[0, 0] and (inflated[0, 1:] < reference[0, 1:]).all()


def test_cpa_schedule_pretrains_then_alternates_and_ramps():
    from state.tx.models.cpa import CPAPerturbationModel

    model = CPAPerturbationModel(input_dim=6, hidden_dim=8, output_dim=6, pert_dim=3, batch_dim=2, n_latent=4,
                                 n_hidden_encoder=8, n_hidden_decoder=8, n_hidden_adv=8, n_steps_pretrain_ae=3,
                                 n_steps_adv_warmup=4, adv_steps=2, reg_adv=10.0)
    turns = [model.is_adversary_turn(t) for t in range(9)]
    assert turns == [False, False, False, True, True, False, True, True, False]
    assert [model.adversary_weight(t) for t in (0, 3, 5, 7, 20)] == [0.0, 0.0, 5.0, 10.0, 10.0]
    assert not model.automatic_optimization


def _tiny_state_variant(cls):
    return cls(input_dim=4, hidden_dim=8, output_dim=4, pert_dim=3, cell_set_len=5, n_encoder_layers=1,
               n_decoder_layers=1, embed_key="X_hvg", output_space="gene", transformer_backbone_key="GPT2",
               transformer_backbone_kwargs={"n_embd": 8, "n_layer": 1, "n_head": 2}).eval()


def test_old_neuralot_cells_are_independent_and_pseudobulk_sees_the_set():
    from state.tx.models.state_variants import OldNeuralOTPerturbationModel, PseudobulkPerturbationModel

    torch.manual_seed(0)
    batch = {"pert_emb": torch.eye(3)[[0, 1, 2, 0, 1]], "ctrl_cell_emb": torch.randn(5, 4)}
    changed = {**batch, "ctrl_cell_emb": batch["ctrl_cell_emb"].clone()}
    changed["ctrl_cell_emb"][0] += 3.0
    with torch.no_grad():
        per_cell = _tiny_state_variant(OldNeuralOTPerturbationModel)
        torch.testing.assert_close(per_cell(batch, padded=False)[1:], per_cell(changed, padded=False)[1:])
        pooled = _tiny_state_variant(PseudobulkPerturbationModel)
        assert not torch.allclose(pooled(batch, padded=False)[1:], pooled(changed, padded=False)[1:])
    assert pooled.decoder_weight == 0.1 and per_cell.decoder_weight == 1.0


def _scgpt_kwargs(**extra):
    genes = ["G0", "G1", "G2", "G3", "G4"]
    return {"input_dim": 5, "output_dim": 5, "pert_dim": 3, "gene_names": genes, "embsize": 8, "nhead": 2,
            "d_hid": 8, "nlayers": 1, "perturbation_type": "genetic", "output_space": "gene",
            "load_param_prefixes": ["encoder", "value_encoder", "transformer_encoder"], **extra}


def test_scgpt_loads_a_pretrained_folder_safely_and_rebuilds_without_it(tmp_path, monkeypatch):
    from state.tx.models.scgpt import ScGPTPerturbationModel
    from state.tx.nn.scgpt_modules import ScGPTNet
    from state.utils.errors import StateError

    folder = tmp_path / "scgpt_human"
    folder.mkdir()
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, "G3": 3, "OTHER": 4, "G0": 5, "G1": 6}  # G2, G4 unknown
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "args.json").write_text(json.dumps({"embsize": 16, "nheads": 4, "d_hid": 12, "nlayers": 2}))
    torch.manual_seed(1)
    source = ScGPTNet(vocab_size=7, pad_id=0, embsize=16, nhead=4, d_hid=12, nlayers=2, dropout=0.0,
                      input_emb_style="continuous", n_input_bins=51, perturbation_type="genetic", pert_dim=3,
                      pert_pad_id=2).state_dict()
    flash = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in source.items()}  # flash-attn names
    torch.save(flash, folder / "best_model.pt")

    with pytest.raises(StateError, match="args.json"):
        (folder / "args.json").rename(tmp_path / "args.json")
        ScGPTPerturbationModel(**_scgpt_kwargs(pretrained_path=str(folder)))
    (tmp_path / "args.json").rename(folder / "args.json")

    model = ScGPTPerturbationModel(**_scgpt_kwargs(pretrained_path=str(folder)))
    loaded = model.net.state_dict()
    assert loaded["encoder.embedding.weight"].shape == (7, 16)  # sizes from args.json
    for key in ("encoder.embedding.weight", "value_encoder.linear1.weight",
                "transformer_encoder.layers.1.self_attn.in_proj_weight"):
        torch.testing.assert_close(loaded[key], source[key])
    assert not torch.equal(loaded["decoder.fc.0.weight"], source["decoder.fc.0.weight"])  # not in the prefixes
    assert model.hparams["gene_token_ids"] == [5, 6, 0, 3, 0]

    (folder / "best_model.pt").unlink()  # a checkpoint rebuilds from its hyper-parameters alone
    rebuilt = ScGPTPerturbationModel(**dict(model.hparams))
    rebuilt.load_state_dict(model.state_dict())
    batch = {"ctrl_cell_emb": torch.rand(3, 5), "pert_emb": torch.eye(3), "pert_name": ["G1", "G4", "x"]}
    with torch.no_grad():
        whole = model.eval()(batch)
        torch.testing.assert_close(rebuilt.eval()(batch), whole)
        monkeypatch.setattr("state.tx.models.scgpt.ATTENTION_BUDGET", 36 * 2)  # one cell per chunk
        torch.testing.assert_close(model(batch), whole)


def test_scgpt_rejects_embedding_inputs():
    from state.tx.models.scgpt import ScGPTPerturbationModel
    from state.utils.errors import StateError

    with pytest.raises(StateError, match="embed_key=X_hvg"):
        ScGPTPerturbationModel(**_scgpt_kwargs(input_dim=8, output_dim=8))
