"""Check a composed ``state tx train`` config before anything is built.

Nothing here builds models or data: :func:`validate_tx_config` only looks at values, so training,
tests and the CLI can call it before any heavy import. Every problem is collected and reported in
one :class:`StateError` that names the override fixing it.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from state.tx.config.architecture import model_set_length
from state.tx.config.compose import TOML_OVERRIDE, config_groups
from state.utils.errors import collect_errors

OUTPUT_SPACES = ("gene", "all", "embedding")
BASAL_MAPPING_STRATEGIES = ("random", "batch")
DATA_MODULE_NAME = "PerturbationDataModule"
# training.optimizer: arc-state's Adam (no weight decay), or AdamW with training.weight_decay.
OPTIMIZERS = ("adam", "adamw")
# Lightning's accepted precision spellings (Trainer(precision=...)).
PRECISIONS = (
    "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
    "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16,
)  # fmt: skip

def validate_tx_config(cfg: DictConfig, *, known_models: Collection[str] | None = None) -> None:
    """Check a composed config before training; raise one :class:`StateError` listing every problem.

    ``known_models`` is the hook for the model registry: when given, ``model.name`` must be one of
    them (compared case-insensitively). Each problem names the override that fixes it.
    """
    if not isinstance(cfg, DictConfig):  # a plain dict, e.g. a config.yaml read with yaml.safe_load
        cfg = OmegaConf.create(dict(cfg))
    problems: list[str] = []
    problems += _missing_values(cfg)
    problems += _data_problems(cfg)
    problems += _model_problems(cfg, known_models)
    problems += _training_problems(cfg)
    collect_errors(problems, context="invalid tx train config")


def cell_sentence_len(cfg: DictConfig) -> int | None:
    """The number of cells per set that the data module must yield for this model (None: not told).

    The rule is :func:`state.tx.config.architecture.cells_per_set`. Accepts a DictConfig or a plain dict.
    """
    return model_set_length(cfg.get("model") or {})


def _missing_values(cfg: DictConfig) -> list[str]:
    problems = []
    for path in _missing_paths(cfg, prefix=""):
        if path == "data.kwargs.toml_config_path":
            continue  # reported by _data_problems with the usual wording
        problems.append(f"{path} is required (add {path}=...)")
    return problems


def _missing_paths(node, *, prefix: str) -> list[str]:
    """Dotted paths of every ``???`` value (to_container keeps them as the literal string)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if value == "???":
                found.append(f"{prefix}{key}")
            else:
                found += _missing_paths(value, prefix=f"{prefix}{key}.")
    return found


def _select(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(
        cfg, key, default=default, throw_on_missing=False, throw_on_resolution_failure=False
    )


def _data_problems(cfg: DictConfig) -> list[str]:
    problems = []
    name = _select(cfg, "data.name")
    if name != DATA_MODULE_NAME:
        problems.append(
            f"data.name is {name!r}, but the only data module is {DATA_MODULE_NAME} "
            "(data=default is a legacy group: use data=perturbation)"
        )
    kwargs = _select(cfg, "data.kwargs")
    if not OmegaConf.is_dict(kwargs):
        return [*problems, "data.kwargs must be a mapping (use data=perturbation)"]
    toml_path = (
        kwargs.get("toml_config_path") if not OmegaConf.is_missing(kwargs, "toml_config_path") else None
    )
    if toml_path in (None, ""):
        problems.append(f"data.kwargs.toml_config_path is not set (add {TOML_OVERRIDE})")
    elif not Path(str(toml_path)).expanduser().is_file():
        problems.append(f"data.kwargs.toml_config_path={toml_path} does not exist (add {TOML_OVERRIDE})")
    output_space = kwargs.get("output_space")
    if output_space not in OUTPUT_SPACES:
        problems.append(
            f"data.kwargs.output_space={output_space!r} is not one of {'|'.join(OUTPUT_SPACES)} "
            "(e.g. data.kwargs.output_space=gene)"
        )
    strategy = kwargs.get("basal_mapping_strategy", "random")
    if strategy not in BASAL_MAPPING_STRATEGIES:
        problems.append(
            f"data.kwargs.basal_mapping_strategy={strategy!r} is not one of "
            f"{'|'.join(BASAL_MAPPING_STRATEGIES)} (e.g. data.kwargs.basal_mapping_strategy=random)"
        )
    return problems


def _model_problems(cfg: DictConfig, known_models: Collection[str] | None) -> list[str]:
    problems = []
    name = _select(cfg, "model.name")
    if known_models is not None and str(name).lower() not in {m.lower() for m in known_models}:
        problems.append(
            f"model.name={name!r} names no model (known: {', '.join(sorted(known_models))}; "
            f"choose a model file with model=<{'|'.join(config_groups().get('model', []))}>)"
        )
    kwargs = _select(cfg, "model.kwargs")
    if not OmegaConf.is_dict(kwargs):
        return [*problems, "model.kwargs must be a mapping (choose a model file, e.g. model=state)"]
    set_len = kwargs.get("cell_set_len")
    if set_len is not None and not _positive_int(set_len):
        problems.append(f"model.kwargs.cell_set_len={set_len!r} must be a positive integer")
    if cell_sentence_len(cfg) is None:
        problems.append(
            "the model config gives no cell-set length "
            "(add +model.kwargs.transformer_backbone_kwargs.n_positions=<cells per set>)"
        )
    problems += _backbone_problems(kwargs)
    return problems


def _backbone_problems(kwargs: DictConfig) -> list[str]:
    backbone = kwargs.get("transformer_backbone_kwargs")
    if not OmegaConf.is_dict(backbone):
        return []
    prefix = "model.kwargs.transformer_backbone_kwargs"
    key = str(kwargs.get("transformer_backbone_key", "")).lower()
    if key == "llama":
        width_key, heads_key = "hidden_size", "num_attention_heads"
    elif key == "gpt2":
        width_key, heads_key = "n_embd", "n_head"
    else:
        return []
    width, heads = backbone.get(width_key), backbone.get(heads_key)
    if not (_positive_int(width) and _positive_int(heads)):
        return []
    problems = []
    width_name = f"{prefix}.{width_key}"
    if width_key == "hidden_size" and width == kwargs.get("hidden_dim"):
        width_name = "model.kwargs.hidden_dim"
    if width % heads:
        nearest = min((d for d in range(1, width + 1) if width % d == 0), key=lambda d: abs(d - heads))
        problems.append(
            f"{width_name}={width} is not divisible by {prefix}.{heads_key}={heads} "
            f"(set {prefix}.{heads_key} to a divisor of {width}, e.g. {prefix}.{heads_key}={nearest}, "
            f"or change {width_name})"
        )
    kv_heads = backbone.get("num_key_value_heads")
    if key == "llama" and _positive_int(kv_heads) and heads % kv_heads:
        problems.append(
            f"{prefix}.num_attention_heads={heads} is not a multiple of {prefix}.num_key_value_heads={kv_heads} "
            f"(e.g. {prefix}.num_key_value_heads={heads})"
        )
    return problems


def _training_problems(cfg: DictConfig) -> list[str]:
    training = _select(cfg, "training")
    if not OmegaConf.is_dict(training):
        return ["training must be a mapping (choose a training file, e.g. training=default)"]
    problems = []
    for key in ("batch_size", "max_steps", "val_freq"):
        value = training.get(key)
        if not _positive_int(value):
            problems.append(f"training.{key}={value!r} must be a positive integer (e.g. training.{key}=16)")
    lr = training.get("lr")
    if not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0:
        problems.append(f"training.lr={lr!r} must be a positive number (e.g. training.lr=1e-4)")
    precision = training.get("precision", "32-true")
    if precision not in PRECISIONS:
        problems.append(
            f"training.precision={precision!r} is not a Lightning precision "
            "(e.g. training.precision=32-true, bf16-mixed, 16-mixed)"
        )
    optimizer = training.get("optimizer", "adam")
    if optimizer not in OPTIMIZERS:
        problems.append(f"training.optimizer={optimizer!r} is not one of {'|'.join(OPTIMIZERS)} "
                        "(adamw applies training.weight_decay)")
    every = training.get("ckpt_every_n_steps")
    if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
        problems.append(f"training.ckpt_every_n_steps={every!r} must be a step count, 0 or null (off)")
    wd = training.get("weight_decay")
    if optimizer == "adamw" and (not isinstance(wd, int | float) or isinstance(wd, bool) or wd < 0):
        problems.append(f"training.weight_decay={wd!r} must be a number >= 0 with training.optimizer=adamw")
    return problems


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
