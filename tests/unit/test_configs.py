"""The packaged config tree: every option composes, matches arc-state, and bad input fails in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from state.config_paths import configs_dir
from state.emb.config import (
    check_emb_config,
    compose_emb_config,
    dataset_profiles,
    embedding_profiles,
)
from state.tx.config.compose import compose_tx_config, config_groups, train_help_text
from state.tx.config.validate import cell_sentence_len, validate_tx_config
from state.utils.errors import StateError

ARC_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "arc_configs"

MODEL_NAMES = {  # Hydra choice -> model.name (which selects the Python class)
    "state": "state", "state_sm": "state", "state_lg": "state", "tahoe_best": "state",
    "tahoe_llama_212693232": "state", "tahoe_llama_62089464": "state", "pertsets": "state",
    "perturb_mean": "perturb_mean", "context_mean": "context_mean", "celltypemean": "CellTypeMean", "linear": "linear", "state_plus": "state_plus",
    "globalsimplesum": "GlobalSimpleSum", "decoder_only": "decoder_only", "old_neuralot": "old_neuralot",
    "embedsum": "EmbedSum", "pseudobulk": "pseudobulk", "cpa": "CPA", "scvi": "scVI",
    "scgpt-genetic": "scGPT-genetic", "scgpt-chemical": "scGPT-chemical",
}  # fmt: skip
EXTRA_MODELS = {"state_tiny"}
TRAINING_CHOICES = {"default", "cpa", "scvi", "scgpt", "debug"}
TRAINING_KEYS_READ = {
    "batch_size", "lr", "max_steps", "train_seed", "val_freq", "gradient_clip_val",
    "gradient_accumulation_steps", "devices", "strategy", "use_mfu", "mfu_kwargs",
    "cumulative_flops_use_backward", "precision",
}  # fmt: skip
DATA_KWARGS = [
    "toml_config_path", "embed_key", "output_space", "pert_rep", "basal_rep", "num_workers", "pin_memory",
    "n_basal_samples", "downsample", "downsample_cells", "additional_obs", "basal_mapping_strategy",
    "should_yield_control_cells", "batch_col", "pert_col", "cell_type_key", "control_pert", "map_controls",
    "perturbation_features_file", "store_raw_basal", "int_counts", "barcode", "use_consecutive_loading",
    "val_subsample_fraction",
    "fast_loader", "fast_loader_dir", "fast_loader_windows", "prefetch_bytes",  # ours: the training loader
    "combination_separator",  # ours: parts of combination labels
]  # fmt: skip

# The overrides that produced each arc-state run config (fixture READMEs), with the fixture's paths.
_ARC_COMMON = [
    "data.kwargs.toml_config_path=/data/state-fixtures/tx/state_llama/data/split_fewshot.toml",
    "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene", "data.kwargs.num_workers=0",
    "data.kwargs.batch_col=gem_group", "data.kwargs.pert_col=gene", "data.kwargs.cell_type_key=cell_type",
    "data.kwargs.control_pert=non-targeting", "training.max_steps=50", "training.val_freq=25",
    "training.ckpt_every_n_steps=25", "training.batch_size=4", "use_wandb=false", "name=run", "overwrite=true",
    "wandb.local_wandb_dir=/data/state-fixtures-work/wandb_unused",
    "model.kwargs.cell_set_len=16", "model.kwargs.hidden_dim=32",
]  # fmt: skip
ARC_RUN_OVERRIDES = {
    "state_llama": [
        "model=state", "model.kwargs.batch_encoder=true",
        "model.kwargs.transformer_backbone_kwargs.intermediate_size=64",
        "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2",
        "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
        "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
        "model.kwargs.transformer_backbone_kwargs.head_dim=8", "+model.kwargs.decoder_hidden_dims=[48,48]",
    ],
    "state_gpt2": [
        "model=pertsets", "model.kwargs.decoder_hidden_dims=[48,48]", "model.kwargs.n_encoder_layers=2",
        "model.kwargs.n_decoder_layers=2", "model.kwargs.transformer_backbone_kwargs.n_layer=2",
        "model.kwargs.transformer_backbone_kwargs.n_head=4",
    ],
    "perturb_mean": ["model=perturb_mean", "+model.kwargs.decoder_hidden_dims=[48,48]"],
    "context_mean": ["model=context_mean", "+model.kwargs.decoder_hidden_dims=[48,48]"],
}  # fmt: skip
# models whose 0.11.3 YAML adds log1p_from_raw_counts / counts_target_sum (arc-state PR #274)
ARC_0113_MODELS = {"state", "perturb_mean", "context_mean"}
# keys this implementation adds to arc-state's tree (cell-load ignores unknown data.kwargs)
ADDED_KEYS = {("training", "precision"), ("training", "optimizer"), ("data", "kwargs", "fast_loader"),
              ("data", "kwargs", "fast_loader_dir"), ("data", "kwargs", "fast_loader_windows"),
              ("data", "kwargs", "prefetch_bytes"), ("data", "kwargs", "combination_separator")}


@pytest.fixture(scope="module")
def toml_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("toml") / "split.toml"
    path.write_text('[datasets]\nsynth = "/nowhere"\n[training]\nsynth = "train"\n')
    return str(path)


def _key_paths(node, prefix=()):
    """Every key path in order (dicts only), for comparing key order with arc-state's files."""
    paths = []
    if isinstance(node, dict):
        for key, value in node.items():
            paths.append((*prefix, str(key)))
            paths += _key_paths(value, (*prefix, str(key)))
    return paths


# ---------------------------------------------------------------------------------------------- tx


def test_group_choices_are_the_arc_state_ones_plus_extras():
    groups = config_groups()
    assert set(groups) == {"data", "model", "training", "wandb", "experiment"}  # experiment: our overlays
    assert groups["experiment"] == ["demo", "gpu_node"]
    assert set(groups["model"]) == set(MODEL_NAMES) | EXTRA_MODELS
    assert set(groups["training"]) == TRAINING_CHOICES
    assert groups["data"] == ["default", "perturbation"]
    assert groups["wandb"] == ["default"]


def test_default_config_top_level_and_data_keys():
    cfg = compose_tx_config([])
    assert list(cfg.keys()) == [
        "data", "model", "training", "wandb", "name", "output_dir", "use_wandb", "overwrite",
        "return_adatas", "pred_adata_path", "true_adata_path",
    ]  # fmt: skip
    assert "hydra" not in cfg
    assert list(cfg.data.kwargs.keys()) == DATA_KWARGS
    assert cfg.data.name == "PerturbationDataModule"
    assert cfg.data.kwargs.toml_config_path is None
    assert (cfg.data.kwargs.output_space, cfg.data.kwargs.control_pert, cfg.data.kwargs.num_workers) == (
        "all", "DMSO_TF", 12,
    )  # fmt: skip
    assert cfg.model.name == "state"
    assert (cfg.name, cfg.output_dir, cfg.use_wandb, cfg.overwrite) == ("debug", "./debugging", True, False)
    assert dict(cfg.wandb) == {"entity": "your_entity_name", "project": "state",
                               "local_wandb_dir": "./wandb_logs", "tags": []}  # fmt: skip


@pytest.mark.parametrize("choice", sorted(set(MODEL_NAMES) | EXTRA_MODELS))
def test_every_model_choice_composes_resolves_and_validates(choice, toml_file):
    cfg = compose_tx_config([f"model={choice}", f"data.kwargs.toml_config_path={toml_file}"])
    assert cfg.model.name == MODEL_NAMES.get(choice, "state")
    assert set(cfg.model.keys()) == {"name", "checkpoint", "device", "kwargs"}
    assert "${" not in OmegaConf.to_yaml(cfg)  # every interpolation resolved
    length = cell_sentence_len(cfg)
    assert isinstance(length, int) and length > 0
    if choice.startswith("scgpt"):  # the pretrained weights folder is a required value
        with pytest.raises(StateError, match=r"model\.kwargs\.pretrained_path is required"):
            validate_tx_config(cfg)
        cfg.model.kwargs.pretrained_path = "/weights"
    validate_tx_config(cfg)


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*prefix, str(key)))]
    return [prefix]


@pytest.mark.parametrize("choice", config_groups()["experiment"])
def test_every_experiment_overlay_composes_validates_and_only_sets_known_keys(choice, toml_file):
    """An overlay with a misspelt key would silently add it (the tree is open): every key must exist."""
    base = OmegaConf.to_container(compose_tx_config([f"data.kwargs.toml_config_path={toml_file}"]))
    cfg = compose_tx_config([f"+experiment={choice}"])
    overlay = OmegaConf.to_container(OmegaConf.load(configs_dir() / "experiment" / f"{choice}.yaml"))
    for path in _leaves(overlay):
        node = base
        for key in path[:-1]:
            node = node[key]
        assert path[-1] in node, ".".join(path)
        assert OmegaConf.select(cfg, ".".join(path)) == OmegaConf.select(OmegaConf.create(overlay), ".".join(path))
    validate_tx_config(compose_tx_config([f"+experiment={choice}", f"data.kwargs.toml_config_path={toml_file}"]))


def test_gpu_node_overlay_is_bf16_with_the_fast_loader_required(toml_file):
    cfg = compose_tx_config(["+experiment=gpu_node", "model=state_sm", f"data.kwargs.toml_config_path={toml_file}"])
    assert cfg.training.precision == "bf16-mixed" and cfg.data.kwargs.fast_loader is True
    assert cfg.data.kwargs.pin_memory is True and cfg.data.kwargs.num_workers >= 4
    assert cfg.model.kwargs.hidden_dim == compose_tx_config(["model=state_sm"]).model.kwargs.hidden_dim  # recipe kept


@pytest.mark.parametrize("choice", sorted(TRAINING_CHOICES))
def test_every_training_choice_has_the_keys_the_trainer_reads(choice, toml_file):
    cfg = compose_tx_config([f"training={choice}", f"data.kwargs.toml_config_path={toml_file}"])
    assert TRAINING_KEYS_READ <= set(cfg.training.keys())
    assert set(cfg.training.mfu_kwargs.keys()) == {"available_flops", "use_backward", "logging_interval",
                                                   "window_size"}  # fmt: skip
    assert isinstance(cfg.training.lr, float)
    validate_tx_config(cfg)


def test_training_defaults_match_arc_state():
    training = compose_tx_config([]).training
    assert (training.batch_size, training.lr, training.max_steps) == (16, 1e-4, 400000)
    assert training.val_freq == 2000
    assert training.mfu_kwargs.available_flops == 60e12
    assert training.precision == "32-true"
    scvi = compose_tx_config(["training=scvi"]).training
    assert (scvi.batch_size, scvi.lr, scvi.n_epochs_kl_warmup, scvi.use_mfu) == (2048, 5e-4, 1e4, False)


@pytest.mark.parametrize("run", sorted(ARC_RUN_OVERRIDES))
def test_arc_state_run_config_is_reproduced_key_for_key(run):
    """Same overrides as the arc-state run -> same resolved config, same key order (plus our added keys)."""
    expected = yaml.safe_load((ARC_CONFIGS / f"tx_{run}.yaml").read_text())
    overrides = [*_ARC_COMMON, *ARC_RUN_OVERRIDES[run], f"output_dir=/data/state-fixtures/tx/{run}"]
    ours = OmegaConf.to_container(compose_tx_config(overrides))
    # round-trip through YAML so both sides have the same scalar types (1e-6 -> float etc.)
    ours = yaml.safe_load(OmegaConf.to_yaml(OmegaConf.create(ours)))
    for *parents, key in ADDED_KEYS:
        node = ours
        for name in parents:
            node = node[name]
        node.pop(key)
    kwargs = ours["model"]["kwargs"]
    choice = next(o.split("=")[1] for o in ARC_RUN_OVERRIDES[run] if o.startswith("model="))
    if choice in ARC_0113_MODELS:  # 0.11.3's two keys, absent from 0.11.1's files
        assert (kwargs.pop("log1p_from_raw_counts"), kwargs.pop("counts_target_sum")) == (False, 10000)
    assert ours == expected
    assert _key_paths(ours) == _key_paths(expected)


def test_arc_state_0_11_3_override_lines_work_without_plus():
    """0.11.3 ships the raw-count keys in model/state|perturb_mean|context_mean.yaml; its users' lines
    (no `+`) compose, and so do the `+` lines written for 0.11.1."""
    for choice in sorted(ARC_0113_MODELS):
        cfg = compose_tx_config([f"model={choice}", "model.kwargs.log1p_from_raw_counts=true",
                                 "model.kwargs.counts_target_sum=5000", "+data.kwargs.is_log1p=false"])
        assert (cfg.model.kwargs.log1p_from_raw_counts, cfg.model.kwargs.counts_target_sum) == (True, 5000)
        keys = list(cfg.model.kwargs)  # 0.11.3's position: both keys side by side
        assert keys.index("counts_target_sum") == keys.index("log1p_from_raw_counts") + 1
    cfg = compose_tx_config(["+model.kwargs.log1p_from_raw_counts=true", "+model.kwargs.counts_target_sum=100"])
    assert cfg.model.kwargs.log1p_from_raw_counts is True and cfg.model.kwargs.counts_target_sum == 100
    with pytest.raises(StateError, match="unknown config key 'model.kwargs.log1p_from_raw_counts'"):
        compose_tx_config(["model=state_sm", "model.kwargs.log1p_from_raw_counts=true"])  # not in 0.11.3's


def test_interpolations_follow_overrides():
    cfg = compose_tx_config(["model.kwargs.cell_set_len=64", "model.kwargs.hidden_dim=96"])
    backbone = cfg.model.kwargs.transformer_backbone_kwargs
    assert (backbone.max_position_embeddings, backbone.hidden_size) == (64, 96)
    gpt2 = compose_tx_config(["model=pertsets", "model.kwargs.cell_set_len=32", "model.kwargs.hidden_dim=48"])
    kw = gpt2.model.kwargs.transformer_backbone_kwargs
    assert (kw.n_positions, kw.max_position_embeddings, kw.n_embd, kw.hidden_size) == (32, 32, 48, 48)
    embedsum = compose_tx_config(["model=embedsum", "model.kwargs.cell_set_len=8"])
    assert cell_sentence_len(embedsum) == 8  # no +n_positions needed (arc-state needed one)
    assert cell_sentence_len(compose_tx_config(["model=cpa"])) == 512


def test_composed_config_is_open_for_derived_keys():
    cfg = compose_tx_config([])
    cfg.model.kwargs.decoder_cfg = {"latent_dim": 8}  # training adds keys; must not raise
    assert cfg.model.kwargs.decoder_cfg.latent_dim == 8


def test_plus_adds_a_key_and_group_switch_works():
    cfg = compose_tx_config(["+model.kwargs.decoder_hidden_dims=[48,48]", "+training.log_every_n_steps=5"])
    assert list(cfg.model.kwargs.decoder_hidden_dims) == [48, 48]
    assert cfg.training.log_every_n_steps == 5
    cfg = compose_tx_config(["model=state_sm", "training=scvi", "data=default"])
    assert cfg.model.kwargs.cell_set_len == 128 and cfg.training.batch_size == 2048
    assert cfg.data.kwargs.embed_key == "X_uce"


def test_arc_state_workaround_append_onto_existing_key_still_works():
    # arc-state needed +training.use_mfu=false for training=cpa; our file has the key already.
    cfg = compose_tx_config(["training=cpa", "+training.use_mfu=true"])
    assert cfg.training.use_mfu is True


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.kwargs.hiden_dim=3"], r"unknown config key 'model\.kwargs\.hiden_dim'.*did you mean "
                                       r"model\.kwargs\.hidden_dim=3\?.*\+model\.kwargs\.hiden_dim=3 to add a key"),
        (["model=nope"], r"unknown model choice 'nope'.*state_sm"),
        (["training=nope"], r"unknown training choice 'nope'.*cpa, debug, default, scgpt, scvi"),
        (["training.batch_size=[1,2"], r"cannot parse the override 'training\.batch_size=\[1,2'"),
        (["justakey"], r"cannot parse the override 'justakey'"),
        (["training.lr=1,2"], r"'training\.lr=1,2' is a sweep"),
        (["~model.kwargs.nope"], r"cannot delete 'model\.kwargs\.nope'"),
        (["model.kwargs.hidden_dim=${nowhere}"], r"interpolation that does not resolve"),
    ],
)  # fmt: skip
def test_bad_override_is_one_line_state_error(overrides, expected):
    with pytest.raises(StateError, match=expected) as info:
        compose_tx_config(overrides)
    assert "\n" not in str(info.value)


def test_validate_collects_every_problem_with_the_override_to_type(tmp_path):
    cfg = compose_tx_config(["model.kwargs.hidden_dim=100", "data.kwargs.output_space=genes",
                             "training.batch_size=0", "training.precision=fp8"])  # fmt: skip
    with pytest.raises(StateError) as info:
        validate_tx_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert "data.kwargs.toml_config_path=path/to/split.toml" in message
    assert "model.kwargs.transformer_backbone_kwargs.num_attention_heads=10" in message
    assert "data.kwargs.output_space='genes' is not one of gene|all|embedding" in message
    assert "training.batch_size=0" in message and "training.precision='fp8'" in message

    cfg = compose_tx_config([f"data.kwargs.toml_config_path={tmp_path / 'missing.toml'}"])
    with pytest.raises(StateError, match="missing.toml does not exist"):
        validate_tx_config(cfg)


def test_validate_checks_backbones_and_the_model_registry_hook(toml_file):
    base = [f"data.kwargs.toml_config_path={toml_file}"]
    gpt2 = compose_tx_config([*base, "model=pertsets", "model.kwargs.hidden_dim=30"])
    with pytest.raises(StateError, match=r"kwargs\.n_embd=30 is not divisible by .*n_head=8"):
        validate_tx_config(gpt2)
    gqa = compose_tx_config([*base, "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=5"])
    with pytest.raises(StateError, match="not a multiple of .*transformer_backbone_kwargs.num_key"):
        validate_tx_config(gqa)
    cfg = compose_tx_config([*base, "model=embedsum"])
    validate_tx_config(cfg, known_models={"EmbedSum", "state"})
    with pytest.raises(StateError, match=r"model\.name='EmbedSum' names no model"):
        validate_tx_config(cfg, known_models={"state"})
    no_length = compose_tx_config([*base, "model=embedsum", "~model.kwargs.transformer_backbone_kwargs",
                                   "~model.kwargs.cell_set_len"])  # fmt: skip
    with pytest.raises(StateError, match=r"\+model\.kwargs\.transformer_backbone_kwargs\.n_positions="):
        validate_tx_config(no_length)
    plain = OmegaConf.to_container(compose_tx_config(base))  # e.g. a run's config.yaml read back
    validate_tx_config(plain)
    legacy = compose_tx_config(["data=default"])
    with pytest.raises(StateError, match="data=perturbation"):
        validate_tx_config(legacy)


def test_help_text_lists_header_config_examples_and_groups():
    text = train_help_text()
    lines = text.splitlines()
    assert lines[0] == "Hydra Configuration Help"
    assert set(lines[1]) == {"="}
    assert lines[2] == "Configuration for method: tx"
    assert "  toml_config_path: null" in text and "hidden_size: ${model.kwargs.hidden_dim}" in text
    assert "model.kwargs.hidden_dim=512" in text and "data=custom_data model=custom_model" in text
    groups_at = lines.index("Available config groups:")
    listed = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in lines[groups_at + 1 :]}
    assert set(listed) == set(config_groups())
    assert all(stem in listed["model"] for stem in MODEL_NAMES)


# --------------------------------------------------------------------------------------------- emb


def test_emb_defaults_have_arc_state_keys_profiles_and_no_cluster_paths():
    ours = OmegaConf.to_container(compose_emb_config(None, []), resolve=False)
    reference = yaml.safe_load((ARC_CONFIGS / "emb_state_defaults_plus_synth.yaml").read_text())
    del reference["embeddings"]["synth"], reference["dataset"]["synth"]
    assert _key_paths(ours) == _key_paths(reference)
    assert ours["embeddings"]["current"] == "esm2-cellxgene" and ours["dataset"]["current"] == "cellxgene"
    assert ours["embeddings"]["evo2-scbasecamp"]["size"] == 4096
    assert ours["dataset"]["SE-167M"]["num_datasets"] == 14418
    assert (ours["model"]["emsize"], ours["optimizer"]["max_lr"], ours["dataset"]["N"]) == (512, 1e-5, 512)
    text = (configs_dir() / "state-defaults.yaml").read_text()
    assert "/large_storage" not in text and "/home/" not in text and "/scratch" not in text


def test_emb_overrides_apply_with_hydra_grammar():
    cfg = compose_emb_config(None, ["model.nlayers=2", "optimizer.max_lr=1e-3", "+extra.list=[1,2]",
                                    "++model.new=x", "~task", "embeddings.current=SE-167M"])  # fmt: skip
    assert (cfg.model.nlayers, cfg.optimizer.max_lr, cfg.model.new) == (2, 1e-3, "x")
    assert list(cfg.extra.list) == [1, 2]
    assert "task" not in cfg
    assert cfg.experiment.name == "vci_pretrain_tabular_16_2"  # interpolation kept live
    check_emb_config(cfg)


def test_emb_conf_replaces_defaults_and_conf_only_keys_can_be_overridden(tmp_path):
    conf = tmp_path / "my.yaml"
    conf.write_text(
        "embeddings:\n  current: mine\n  mine: {all_embeddings: /e.pt, ds_emb_mapping: /m.torch, size: 8, num: 3}\n"
        "dataset:\n  current: mine\n  mine: {ds_type: h5ad, train: /t.csv, val: /v.csv, num_datasets: 2}\n"
        "model: {nlayers: 4}\n"
    )
    # embeddings.mine.size exists only in --conf (arc-state rejected this override)
    cfg = compose_emb_config(str(conf), ["embeddings.mine.size=16", "model.emsize=64"])
    assert cfg.embeddings.mine.size == 16
    assert cfg.model.emsize == 64  # a key of the packaged defaults may still be set, as in arc-state
    assert "optimizer" not in cfg  # the packaged defaults were replaced, not merged
    assert embedding_profiles(cfg) == ["mine"] and dataset_profiles(cfg) == ["mine"]
    check_emb_config(cfg, for_fit=True)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.nlayer=3"], r"unknown config key 'model\.nlayer'.*did you mean model\.nlayers=3\?"),
        (["model.nlayers"], r"cannot parse the override 'model\.nlayers'"),
        (["+model.nlayers=3"], r"'model\.nlayers' already exists"),
        (["~model.zz"], r"cannot delete 'model\.zz'"),
        (["model.nlayers=1,2"], r"is a sweep"),
    ],
)
def test_emb_bad_override_is_one_line_state_error(overrides, expected):
    with pytest.raises(StateError, match=expected) as info:
        compose_emb_config(None, overrides)
    assert "\n" not in str(info.value)


def test_emb_bad_conf_file_is_a_state_error(tmp_path):
    with pytest.raises(StateError, match="not found"):
        compose_emb_config(tmp_path / "nope.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(StateError, match="not valid YAML"):
        compose_emb_config(bad, [])


def test_check_emb_config_reports_null_or_unknown_profiles_and_missing_paths():
    with pytest.raises(StateError, match=r"embeddings\.current is not set.*SE-167M") as info:
        check_emb_config(compose_emb_config(None, ["embeddings.current=null", "dataset.current=nope"]))
    assert "dataset.current='nope' names no profile in dataset" in str(info.value)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    cfg = compose_emb_config(None, [])
    check_emb_config(cfg)  # inference-time check: paths are not needed
    with pytest.raises(StateError) as info:
        check_emb_config(cfg, for_fit=True)
    message = str(info.value)
    assert "experiment.checkpoint.path is required" in message
    assert "embeddings.esm2-cellxgene.all_embeddings is required" in message
    assert "dataset.cellxgene.train is required" in message
    assert "evo2-scbasecamp" not in message  # unused profiles may keep their ???
