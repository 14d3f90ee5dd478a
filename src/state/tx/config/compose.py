"""The Hydra config of ``state tx train``: compose it and explain it.

The packaged tree (``configs/``: ``config.yaml`` plus the ``data``, ``model``, ``training`` and
``wandb`` groups) is composed with Hydra's compose API, so the override grammar is Hydra's:
``a.b=v`` for existing keys, ``+a.b=v`` to add one, ``++a.b=v`` to add or replace, ``~a.b`` to
delete, ``model=state_sm`` to switch a group. Hydra's multi-line errors become one-line
:class:`StateError` messages that name the override and the fix.

Checking the composed values is :mod:`state.tx.config.validate`'s job.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from state.config_paths import configs_dir
from state.utils.errors import StateError, first_line

log = logging.getLogger(__name__)

CONFIG_NAME = "config"
TOML_OVERRIDE = "data.kwargs.toml_config_path=path/to/split.toml"


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def config_groups() -> dict[str, list[str]]:
    """Each config group folder of the packaged tree and the (sorted) stems of its YAML files."""
    root = configs_dir()
    groups = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        stems = sorted(f.stem for f in folder.glob("*.yaml"))
        if stems:
            groups[folder.name] = stems
    return groups


def compose_tx_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the packaged config with Hydra overrides and resolve every interpolation.

    The result is not in struct mode, so training code may add derived keys. Raises
    :class:`StateError` (one line) for an unknown key, an unknown group choice, a syntax error or
    an interpolation that does not resolve.
    """
    cfg = _compose(list(overrides))
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise StateError(
            f"the config has an interpolation that does not resolve: {first_line(exc)}",
            hint="interpolations name absolute keys, e.g. ${model.kwargs.hidden_dim}",
        ) from None
    OmegaConf.set_struct(cfg, False)
    return cfg


def _compose(overrides: list[str]) -> DictConfig:
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    _check_override_syntax(overrides)
    pending = list(overrides)
    # arc-state users wrote `+training.use_mfu=false` because its training/cpa.yaml lacked the key;
    # our files have it, so an append onto an existing key is retried as add-or-replace (`++`).
    for _ in range(len(overrides) + 1):
        try:
            return _compose_once(pending)
        except MissingConfigException as exc:  # a subclass of ConfigCompositionException
            raise _missing_choice_error(exc, pending) from None
        except ConfigCompositionException as exc:
            promoted = _promote_colliding_append(pending, str(exc))
            if promoted is None:
                raise _composition_error(str(exc), pending) from None
            pending = promoted
        except (HydraException, OmegaConfBaseException) as exc:
            raise StateError(f"cannot compose the tx config: {first_line(exc)}") from None
    raise StateError("cannot compose the tx config: conflicting overrides " + " ".join(overrides))


def _compose_once(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(configs_dir()), version_base=None, job_name="state_tx"):
        return compose(config_name=CONFIG_NAME, overrides=overrides)


def _check_override_syntax(overrides: list[str]) -> None:
    """Parse each override on its own so that the error names the one that is malformed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as exc:
            raise StateError(
                f"cannot parse the override {text!r}: {first_line(exc)}",
                hint="write key=value (quote values with spaces or commas: key='a,b'; lists as key=[a,b])",
            ) from None
        if override.is_sweep_override():
            raise StateError(
                f"the override {text!r} is a sweep, which `state tx train` does not run",
                hint="give one value; for a list write key=[a,b], for a string with commas key='a,b'",
            )


_APPEND_COLLISION = re.compile(r"An item is already at '([^']+)'")
_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")
_DELETE_MISSING = re.compile(r"Could not delete from config\. '([^']+)' does not exist")


def _promote_colliding_append(overrides: list[str], message: str) -> list[str] | None:
    match = _APPEND_COLLISION.search(message)
    if not match:
        return None
    key = match.group(1)
    changed = False
    promoted = []
    for text in overrides:
        if text.startswith("+") and not text.startswith("++") and text[1:].split("=", 1)[0] == key:
            log.debug("override %s: %s already exists, setting it instead of adding it", text, key)
            text = "+" + text
            changed = True
        promoted.append(text)
    return promoted if changed else None


def _override_for(key: str, overrides: list[str]) -> str | None:
    for text in overrides:
        if text.lstrip("+~").split("=", 1)[0] == key:
            return text
    return None


def _composition_error(message: str, overrides: list[str]) -> StateError:
    if match := _UNKNOWN_KEY.search(message):
        key = match.group(1)
        text = _override_for(key, overrides) or f"{key}=..."
        value = text.split("=", 1)[1] if "=" in text else "..."
        guess = _closest_key(key, overrides)
        did_you_mean = f"did you mean {guess}={value}? " if guess else ""
        return StateError(
            f"unknown config key {key!r} in override {text!r}",
            hint=f"{did_you_mean}use +{key}={value} to add a key; `state tx train --help` lists every key",
        )
    if match := _DELETE_MISSING.search(message):
        key = match.group(1)
        return StateError(f"cannot delete {key!r}: the config has no such key", hint="drop the ~ override")
    return StateError(f"cannot compose the tx config: {first_line(message)}")


def _closest_key(key: str, overrides: list[str]) -> str | None:
    """The existing key nearest to a misspelt one, looked up in the config of the chosen groups."""
    groups = config_groups()
    choices = [t for t in overrides if t.split("=", 1)[0] in groups or t.startswith("hydra.")]
    try:
        cfg = _compose_once(choices)
    except Exception:  # only a suggestion: never mask the real error
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not OmegaConf.is_dict(node):
        return None
    names = [str(k) for k in node.keys()]
    if not parent:
        names += list(groups)
    match = difflib.get_close_matches(leaf, names, n=1, cutoff=0.75)
    return f"{parent}.{match[0]}" if match and parent else (match[0] if match else None)


def _missing_choice_error(exc: Exception, overrides: list[str]) -> StateError:
    missing = getattr(exc, "missing_cfg_file", None) or ""
    match = re.search(r"Could not find '([^']+)'", str(exc))
    missing = match.group(1) if match else missing
    group, _, choice = missing.rpartition("/")
    groups = config_groups()
    if group in groups:
        text = _override_for(group, overrides) or f"{group}={choice}"
        return StateError(
            f"unknown {group} choice {choice!r} in override {text!r}",
            hint=f"available {group} choices: {', '.join(groups[group])}",
        )
    return StateError(f"config {missing!r} not found: {first_line(exc)}")


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------


def train_help_text() -> str:
    """What ``state tx train --help`` prints: the default config, override examples and groups."""
    default_yaml = OmegaConf.to_yaml(_compose([]))
    groups = config_groups()
    width = max(len(name) for name in groups) if groups else 0
    group_lines = [f"  {name:<{width}} : {', '.join(stems)}" for name, stems in groups.items()]
    lines = [
        "Hydra Configuration Help",
        "=" * 60,
        "Configuration for method: tx",
        "",
        "Default configuration (what `state tx train` composes with no overrides):",
        "-" * 60,
        default_yaml.rstrip(),
        "-" * 60,
        "",
        "Usage examples:",
        "  Required: the TOML file that lists datasets and splits",
        f"    state tx train {TOML_OVERRIDE}",
        "  Override a single value",
        "    state tx train training.batch_size=64",
        "    state tx train model.kwargs.hidden_dim=512",
        "  Override several values at once",
        "    state tx train training.max_steps=1000 training.lr=5e-4 model.kwargs.cell_set_len=256",
        "  Switch a config group to another file (one of the choices listed below)",
        "    state tx train model=state_sm training=debug",
        "  Use your own group files: put custom_data.yaml in DIR/data/ and custom_model.yaml in DIR/model/, then",
        "    state tx train hydra.searchpath=[file:///abs/path/DIR] data=custom_data model=custom_model",
        "  Add a key that the defaults do not have (+), add-or-replace (++), delete (~)",
        "    state tx train '+model.kwargs.decoder_hidden_dims=[1024,512]'",
        "",
        "Available config groups:",
        *group_lines,
    ]
    return "\n".join(lines)
