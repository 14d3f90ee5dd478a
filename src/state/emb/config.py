"""The config of ``state emb fit``: packaged defaults or a ``--conf`` file, then overrides.

The base is the packaged ``state-defaults.yaml``, or the ``--conf`` file, which replaces it
entirely. The positional overrides are then applied to that base with Hydra's override grammar
(``a.b=v``, ``+a.b=v`` to add, ``++a.b=v`` to add or replace, ``~a.b`` to delete). A plain
``a.b=v`` must name a key of the base or of the packaged defaults; unlike arc-state, a key that
exists only in the ``--conf`` file can be overridden too.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from state.config_paths import configs_dir
from state.utils.errors import StateError, collect_errors, first_line

DEFAULTS_FILE = "state-defaults.yaml"
_MISSING = "???"


def emb_defaults_path() -> Path:
    return configs_dir() / DEFAULTS_FILE


def compose_emb_config(conf: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build the SE config: ``conf`` (or the packaged defaults) with ``overrides`` applied in order."""
    defaults = _load_yaml(emb_defaults_path(), what="the packaged emb defaults")
    cfg = _load_yaml(Path(conf), what="--conf file") if conf else defaults.copy()
    for text in overrides:
        _apply_override(cfg, text, defaults=defaults)
    return cfg


def _load_yaml(path: Path, *, what: str) -> DictConfig:
    if not path.is_file():
        raise StateError(f"{what} {str(path)!r} not found", hint="pass an existing YAML file to --conf")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError or an OmegaConf error: both mean "not a usable YAML"
        first = first_line(exc)
        raise StateError(f"{what} {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(cfg, DictConfig):
        raise StateError(f"{what} {str(path)!r} must hold a mapping of sections, not a list")
    return cfg


def _apply_override(cfg: DictConfig, text: str, *, defaults: DictConfig) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(text)
    except HydraException as exc:
        first = first_line(exc)
        raise StateError(
            f"cannot parse the override {text!r}: {first}",
            hint="write key=value (quote values with spaces or commas: key='a,b'; lists as key=[a,b])",
        ) from None
    if override.is_sweep_override():
        raise StateError(
            f"the override {text!r} is a sweep", hint="give one value; for a list write key=[a,b]"
        )
    if override.package is not None:
        raise StateError(f"the override {text!r} uses a @package, which emb configs do not have")
    key = override.key_or_group
    exists = _has_key(cfg, key)
    if override.is_delete():
        if not exists:
            raise StateError(f"cannot delete {key!r}: the config has no such key", hint="drop the ~ override")
        _delete(cfg, key)
        return
    value = override.value()
    value_text = text.split("=", 1)[1] if "=" in text else ""
    if override.is_add() and exists:
        raise StateError(
            f"{key!r} already exists, so {text!r} cannot add it",
            hint=f"use {key}={value_text} (or ++{key}={value_text})",
        )
    if not exists and not (override.is_add() or override.is_force_add()) and not _has_key(defaults, key):
        guess = _closest_key(cfg, key)
        did_you_mean = f"did you mean {guess}={value_text}? " if guess else ""
        raise StateError(
            f"unknown config key {key!r} in override {text!r}",
            hint=f"{did_you_mean}use +{key}={value_text} to add a key",
        )
    try:
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    except OmegaConfBaseException as exc:
        first = first_line(exc)
        raise StateError(f"cannot apply the override {text!r}: {first}") from None


def _has_key(cfg: DictConfig, key: str) -> bool:
    """True when the dotted ``key`` exists, also when its value is ``???`` (unlike ``in``)."""
    node = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
    if isinstance(parent, ListConfig):
        del parent[int(leaf)]
    else:
        del parent[leaf]


def _closest_key(cfg: DictConfig, key: str) -> str | None:
    parent_key, _, leaf = key.rpartition(".")
    if parent_key and not _has_key(cfg, parent_key):
        return None
    parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        return None
    match = difflib.get_close_matches(leaf, [str(k) for k in parent.keys()], n=1, cutoff=0.75)
    if not match:
        return None
    return f"{parent_key}.{match[0]}" if parent_key else match[0]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _section(cfg: DictConfig, name: str) -> dict:
    tree = OmegaConf.to_container(cfg, resolve=False)
    section = tree.get(name) if isinstance(tree, dict) else None
    return section if isinstance(section, dict) else {}


def embedding_profiles(cfg: DictConfig) -> list[str]:
    """Names of the gene-embedding profiles under ``embeddings`` (every mapping except ``current``)."""
    return [str(k) for k, v in _section(cfg, "embeddings").items() if k != "current" and isinstance(v, dict)]


def dataset_profiles(cfg: DictConfig) -> list[str]:
    """Names of the dataset profiles under ``dataset`` (mappings with ``train`` or ``ds_type``)."""
    return [
        str(k)
        for k, v in _section(cfg, "dataset").items()
        if isinstance(v, dict) and ("train" in v or "ds_type" in v)
    ]


def check_emb_config(cfg: DictConfig, *, for_fit: bool = False) -> None:
    """Check that ``embeddings.current`` and ``dataset.current`` name existing profiles.

    With ``for_fit=True`` also report every required value (``???``) that training would read:
    the chosen profiles' paths, ``experiment.checkpoint.path`` and anything else outside the
    unused profiles. All problems are raised together as one :class:`StateError` (exit 2).
    """
    problems = [
        *_current_problem(cfg, "embeddings", embedding_profiles(cfg)),
        *_current_problem(cfg, "dataset", dataset_profiles(cfg)),
    ]
    if for_fit and not problems:
        for path in _missing_paths_for_fit(cfg):
            problems.append(f"{path} is required (add {path}=... or set it in the --conf file)")
    collect_errors(problems, context="invalid emb config")


def _current_problem(cfg: DictConfig, section: str, profiles: list[str]) -> list[str]:
    current = OmegaConf.select(cfg, f"{section}.current", default=None, throw_on_missing=False)
    choices = ", ".join(profiles) if profiles else f"none: add a profile under {section}"
    if current in (None, "", _MISSING):
        return [f"{section}.current is not set (add {section}.current=<profile>; profiles: {choices})"]
    if str(current) not in profiles:
        return [f"{section}.current={current!r} names no profile in {section} (profiles: {choices})"]
    return []


def _missing_paths_for_fit(cfg: DictConfig) -> list[str]:
    tree = OmegaConf.to_container(cfg, resolve=False)
    unused = {("embeddings", name) for name in embedding_profiles(cfg) if name != cfg.embeddings.current} | {
        ("dataset", name) for name in dataset_profiles(cfg) if name != cfg.dataset.current
    }
    found: list[str] = []

    def walk(node, path: tuple[str, ...]) -> None:
        if path[:2] in unused:
            return
        if node == _MISSING:
            found.append(".".join(path))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, str(key)))

    walk(tree, ())
    return found
