"""Which training loader runs: the fast layout loader or cell-load's own.

``data.kwargs.fast_loader``: ``auto`` (default) uses the layout when every file of the TOML has an
up-to-date one written by ``state tx index`` with the matrices this run reads; otherwise it says in
one line how to create it, unless there is none and every matrix fits the in-memory obsm cache (the
layout would gain little then); ``true`` requires it (an error names what is missing); ``false`` always
uses cell-load. The layout serves ``embed_key`` null (cells from ``X``) and ``output_space=all``
(targets from ``X``) too, when it holds ``X`` (``state tx index --keys X,...``). A truncated layout file
is an error in every mode. Validation runs on the same layout (:func:`eval_loader`: no shuffling, every
cell once per epoch); the test loader (batches of one set, used by ``predict``) stays cell-load's. Nothing of this reaches the files
arc-state reads (``data_module.torch`` holds cell-load's own fields only).
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from state.utils.errors import StateError

log = logging.getLogger(__name__)

DEFAULT_PREFETCH_BYTES = 256 * 2**20  # per rank: batches the fast loader's workers keep ready
MODES = {"auto": "auto", "true": "true", "false": "false", "1": "true", "0": "false", "yes": "true", "no": "false"}


@dataclass
class FastLoaderChoice:
    use: bool
    windows: int = 4
    layout_dir: str | None = None
    required: bool = False
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES


def _mode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    mode = MODES.get(str("auto" if value is None else value).strip().lower())
    if mode is None:
        raise StateError(f"data.kwargs.fast_loader={value!r} is not auto, true or false",
                         hint="data.kwargs.fast_loader=auto")
    return mode


def unsupported_settings(kw: Mapping[str, Any]) -> list[str]:
    """Settings the layout loader does not implement (cell-load then serves the training split)."""
    out = []
    for key in ("additional_obs", "cache_perturbation_control_pairs", "use_consecutive_loading", "downsample_cells",
                "exp_counts"):
        if kw.get(key):
            out.append(f"{key}={kw.get(key)}")
    if kw.get("output_space") == "all" and kw.get("downsample") not in (None, 1, 1.0):
        out.append(f"downsample={kw.get('downsample')} (cell-load thins the counts of X per draw)")
    if kw.get("map_controls") is False:
        out.append("map_controls=false")
    return out


def needed_keys(kw: Mapping[str, Any]) -> list[str]:
    from state.tx.data.layout import matrix_keys

    return list(dict.fromkeys(k for k in matrix_keys(kw) if k))


def _columns(kw: Mapping[str, Any]) -> dict[str, str]:
    return {"pert_col": str(kw.get("pert_col", "gene")), "cell_type_key": str(kw.get("cell_type_key", "cell_type")),
            "batch_col": str(kw.get("batch_col", "gem_group"))}


def index_command(kw: Mapping[str, Any]) -> str:
    cols = _columns(kw)
    parts = ["state", "tx", "index", "--toml", str(kw.get("toml_config_path")), "--keys", ",".join(needed_keys(kw)),
             "--pert-col", cols["pert_col"], "--cell-type-key", cols["cell_type_key"], "--batch-col", cols["batch_col"]]
    if kw.get("fast_loader_dir"):
        parts += ["--layout-dir", str(kw["fast_loader_dir"])]
    return shlex.join(parts)


def layout_gain(sources: list, keys: list[str]) -> str | None:
    """What the layout would gain over cell-load here, or None when every matrix training reads is served
    by the in-memory obsm cache (:mod:`state.tx.data.obsm_cache`: then reads are no bottleneck)."""
    from state.tx.data.obsm_cache import cache_budget_bytes

    budget = cache_budget_bytes()
    if budget <= 0:
        return "the in-memory obsm cache is off (STATE_OBSM_CACHE_MB=0), so cell-load reads one row per cell"
    if "X" in keys:
        return "cell-load reads X (the gene matrix, never cached in memory) one row per cell"
    for source in sources:
        for key in keys:
            size = _dense_bytes(source, key)
            if size > budget:  # the cache's own rule
                return (f"obsm['{key}'] of {source} ({size >> 20} MiB) is past the in-memory obsm cache "
                        f"(STATE_OBSM_CACHE_MB={budget >> 20}), so cell-load reads one row per cell")
    return None


def _dense_bytes(source: Any, key: str) -> int:
    """Size of dense float32 ``obsm[key]`` (0 when it is missing, sparse, or the file cannot be read: cell-load
    reports those itself)."""
    import h5py

    try:
        with h5py.File(source, "r") as handle:
            node = handle.get(f"obsm/{key}")
            return int(np.prod(node.shape)) * 4 if isinstance(node, h5py.Dataset) and node.ndim == 2 else 0
    except OSError:
        return 0


def _fallback(message: str, *args: Any) -> None:
    """A run that could use the fast loader but does not: info on CPU, a warning where a GPU would wait."""
    import torch

    log.log(logging.WARNING if torch.cuda.is_available() else logging.INFO, message, *args)


def decide(kw: Mapping[str, Any]) -> FastLoaderChoice:
    """Choose the training loader for these data kwargs (before cell-load's setup)."""
    from state.tx.data import layout

    mode = _mode(kw.get("fast_loader", "auto"))
    windows = int(kw.get("fast_loader_windows") or 4)
    layout_dir = kw.get("fast_loader_dir") or None
    prefetch = int(kw.get("prefetch_bytes") or DEFAULT_PREFETCH_BYTES)
    if mode == "false":
        return FastLoaderChoice(False)
    problems = unsupported_settings(kw)
    if not problems:
        try:
            sources = layout.toml_sources(kw["toml_config_path"])
        except StateError as exc:
            problems.append(exc.one_line())
            sources = []
        for source in sources:
            broken = layout.truncated_file(source, layout_dir)
            if broken:  # a broken copy, not a choice: refused before anything is written
                raise StateError(f"layout file {broken} is truncated (its size differs from the layout's "
                                 "meta.json)", hint=f"rewrite the layout: `{index_command(kw)}`")
            problem = layout.layout_problem(source, layout_dir, keys=needed_keys(kw), columns=_columns(kw))
            if problem:
                problems.append(problem)
    if not problems:
        log.info("training loader: fast set loader over the layout (%d windows per set)", windows)
        return FastLoaderChoice(True, windows, layout_dir, required=mode == "true", prefetch_bytes=prefetch)
    if mode == "true":
        raise StateError(f"data.kwargs.fast_loader=true but {problems[0]}",
                         hint=f"run `{index_command(kw)}` or set data.kwargs.fast_loader=auto")
    if unsupported_settings(kw):
        try:
            gain = layout_gain(layout.toml_sources(kw["toml_config_path"]), needed_keys(kw))
        except StateError:
            gain = None
        say = _fallback if gain else log.info  # a warning only where the data is large and a GPU would wait
        say("training loader: cell-load (the fast loader does not support %s%s)", "; ".join(problems),
            f"; {gain}: drop the setting to train from the layout" if gain else "")
        return FastLoaderChoice(False)
    gain = layout_gain(sources, needed_keys(kw)) if all(p.startswith("no layout") for p in problems) else ""
    if gain is None:  # no layout, and none needed: cell-load's rows come from memory
        log.debug("training loader: cell-load (%s; the obsm rows fit the in-memory cache)", problems[0])
    else:
        _fallback("training loader: cell-load (%s%s); run `%s`: it writes a group-sorted layout once and training "
                  "then reads whole cell sets as slices, >=20x faster loading (data.kwargs.fast_loader=false hides "
                  "this line)", problems[0], f"; {gain}" if gain else "", index_command(kw))
    return FastLoaderChoice(False)


def training_seed(dm: Any) -> int:
    return int(os.environ.get("PL_GLOBAL_SEED", getattr(dm, "random_seed", 42)))


def train_loader(dm: Any, choice: FastLoaderChoice) -> Any | None:
    """The fast training DataLoader of a set-up data module, or None (cell-load's then serves)."""
    from state.tx.data import loader, split_tables

    if getattr(dm, "_state_fast_groups", None) is None:
        try:
            dm._state_fast_groups = split_tables.groups_from_data_module(dm, choice.layout_dir)
        except LookupError as exc:
            if choice.required:
                raise StateError(f"data.kwargs.fast_loader=true but {exc}", hint="data.kwargs.fast_loader=auto") from exc
            choice.use = False
            log.info("training loader: cell-load (%s)", exc)
            return None
    groups, tables, vocab = dm._state_fast_groups
    return loader.fast_train_loader(dm, groups, tables, vocab, windows=choice.windows, seed=training_seed(dm),
                                    num_workers=int(dm.num_workers), prefetch_bytes=choice.prefetch_bytes)


EVAL_WORKERS = 2  # validation sets are few: two workers keep up, more would only hold memory per rank


def eval_loader(dm: Any, choice: FastLoaderChoice) -> Any | None:
    """The fast validation DataLoader (cell-load's validation split, or its test split when there is no
    validation, as cell-load does): the training sampler without shuffling, every cell once per epoch.
    None: nothing to validate on, or the split cannot be mapped (cell-load's loader serves then)."""
    from state.tx.data import loader, split_tables

    subsets = dm.val_datasets or dm.test_datasets
    if not subsets:
        return None
    if getattr(dm, "_state_fast_eval", None) is None:
        try:
            dm._state_fast_eval = split_tables.groups_from_data_module(dm, choice.layout_dir, subsets)
        except LookupError as exc:
            log.info("validation loader: cell-load (%s)", exc)
            return None
    groups, tables, vocab = dm._state_fast_eval
    workers = min(int(dm.num_workers), EVAL_WORKERS)
    return loader.fast_train_loader(dm, groups, tables, vocab, windows=choice.windows, seed=training_seed(dm),
                                    num_workers=workers, prefetch_bytes=choice.prefetch_bytes, shuffle=False)
