"""The training data: cell-load's ``PerturbationDataModule`` built from ``data.kwargs``.

We do not reimplement cell-load. This module only
- checks the TOML and the h5/h5ad files cheaply with h5py first, so a wrong column, control label
  or path gives one line naming the file and the fix instead of a KeyError deep inside cell-load;
- caps ``num_workers`` at the CPUs this process may use;
- passes every ``data.kwargs`` key through to cell-load unchanged (plus ``batch_size`` and
  ``cell_sentence_len``, as arc-state does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from state.tx.data.files import dataset_files, read_toml
from state.utils.errors import StateError, collect_errors
from state.utils.worker_signals import leave_signals_to_parent

log = logging.getLogger(__name__)

DRUG_PERT_COL = "drugname_drugconc"
DRUG_CONTROL_LABEL = "[('DMSO_TF', 0.0, 'uM')]"
OUTPUT_SPACES = ("gene", "all", "embedding")


def usable_cpu_count() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS tells us)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cap_num_workers(requested: Any) -> int:
    """DataLoader workers: never more than the usable CPUs (12 workers on a 2-core laptop only thrash)."""
    requested = int(requested or 0)
    cap = usable_cpu_count()
    if requested > cap:
        log.info("data.kwargs.num_workers=%d capped at %d (the CPUs available to this process)", requested, cap)
        return cap
    return requested


def effective_data_kwargs(data_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs cell-load receives: arc-state's drug-control quirk and the worker cap applied."""
    kwargs = dict(data_kwargs)
    if kwargs.get("pert_col") == DRUG_PERT_COL:
        # arc-state replaces the control label for Tahoe-style drug columns (after config.yaml is saved).
        kwargs["control_pert"] = DRUG_CONTROL_LABEL
    kwargs["num_workers"] = cap_num_workers(kwargs.get("num_workers", 0))
    return kwargs


# --------------------------------------------------------------------------------------------
# Cheap checks before cell-load runs
# --------------------------------------------------------------------------------------------


@dataclass
class _FileFacts:
    """What one h5 file holds, read from its obs/obsm metadata only."""

    path: Path
    perturbations: set[str] | None = None  # None: the column could not be read (reported already)
    cell_types: set[str] | None = None


def _decode(values: np.ndarray) -> set[str]:
    return {v.decode("utf-8", "ignore") if isinstance(v, bytes | bytearray) else str(v) for v in values}


def _categories(obs: h5py.Group, column: str) -> np.ndarray | None:
    node = obs.get(column)
    if isinstance(node, h5py.Group) and "categories" in node:
        return node["categories"][:]
    return None


def _check_file(path: Path, kw: Mapping[str, Any], problems: list[str]) -> _FileFacts | None:
    facts = _FileFacts(path)
    pert_col, ct_key, batch_col = kw.get("pert_col"), kw.get("cell_type_key"), kw.get("batch_col")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        problems.append(f"{path} is not a readable h5/h5ad file ({exc})")
        return None
    with handle:
        obs = handle.get("obs")
        if not isinstance(obs, h5py.Group):
            problems.append(f"{path} has no obs group (is it an AnnData .h5ad file?)")
            return None
        columns = sorted(obs.keys())
        shown = ", ".join(c for c in columns if not c.startswith("_"))
        for key, column in (("pert_col", pert_col), ("cell_type_key", ct_key)):
            if column not in obs:
                problems.append(
                    f"obs column '{column}' (data.kwargs.{key}) is missing in {path}; obs has: {shown} "
                    f"(fix: data.kwargs.{key}=<one of them>)"
                )
            elif _categories(obs, column) is None:
                problems.append(
                    f"obs column '{column}' in {path} is not categorical "
                    f"(fix: adata.obs['{column}'] = adata.obs['{column}'].astype('category') and rewrite the file)"
                )
        if batch_col not in obs:
            problems.append(
                f"obs column '{batch_col}' (data.kwargs.batch_col) is missing in {path}; obs has: {shown} "
                f"(fix: data.kwargs.batch_col=<one of them>)"
            )
        perts = _categories(obs, pert_col) if pert_col in obs else None
        if perts is not None:
            facts.perturbations = _decode(perts)
            control = str(kw.get("control_pert"))
            if control not in facts.perturbations:
                sample = ", ".join(sorted(facts.perturbations)[:8])
                problems.append(
                    f"control perturbation '{control}' (data.kwargs.control_pert) is not a category of "
                    f"obs/{pert_col} in {path}; some categories: {sample} (fix: data.kwargs.control_pert=<label>)"
                )
        cts = _categories(obs, ct_key) if ct_key in obs else None
        if cts is not None:
            facts.cell_types = _decode(cts)
        _check_matrices(handle, path, kw, problems)
    return facts


def _check_matrices(handle: h5py.File, path: Path, kw: Mapping[str, Any], problems: list[str]) -> None:
    embed_key, output_space = kw.get("embed_key"), kw.get("output_space")
    obsm = handle.get("obsm")
    obsm_keys = sorted(obsm.keys()) if isinstance(obsm, h5py.Group) else []
    if embed_key and embed_key not in obsm_keys:
        problems.append(
            f"obsm['{embed_key}'] (data.kwargs.embed_key) is missing in {path}; obsm has: "
            f"{', '.join(obsm_keys) or 'nothing'} (fix: data.kwargs.embed_key=<one of them>, or null to use X)"
        )
    if embed_key and output_space == "gene" and "X_hvg" not in obsm_keys:
        problems.append(
            f"output_space=gene needs obsm['X_hvg'] (the decoder targets) but {path} lacks it "
            "(fix: run `state tx preprocess_train`, or data.kwargs.output_space=embedding)"
        )
    if not embed_key and "X" not in handle:
        problems.append(f"{path} has no X matrix and data.kwargs.embed_key is null (fix: set data.kwargs.embed_key)")


def _check_toml_entries(config: Any, facts: dict[str, list[_FileFacts]], problems: list[str]) -> None:
    """Cell types and perturbations the TOML names must exist in that dataset's files."""
    for section in ("zeroshot", "fewshot"):
        for key, value in getattr(config, section).items():
            dataset, _, cell_type = key.partition(".")
            files = facts.get(dataset)
            if not files or any(f.cell_types is None or f.perturbations is None for f in files):
                continue  # the file problems are reported already; these checks would only repeat them
            present = set().union(*(f.cell_types for f in files))
            if cell_type not in present:
                problems.append(
                    f"[{section}] names cell type '{cell_type}' ('{key}') but no file of dataset "
                    f"'{dataset}' has it in obs; cell types there: {', '.join(sorted(present)) or 'none'}"
                )
            if section == "zeroshot" and value not in ("train", "val", "test"):
                problems.append(f"[zeroshot] '{key}' = '{value}' must be \"train\", \"val\" or \"test\"")
            if section == "fewshot":
                if not isinstance(value, Mapping):
                    problems.append(f"[fewshot.\"{key}\"] must be a table with val = [...] and test = [...]")
                    continue
                known = set().union(*(f.perturbations for f in files))
                for split in ("val", "test"):
                    missing = [str(p) for p in value.get(split, []) if str(p) not in known]
                    if missing:
                        problems.append(
                            f"[fewshot.\"{key}\"] {split} lists perturbation(s) {', '.join(missing)} that do "
                            f"not occur in dataset '{dataset}'"
                        )


def check_data_inputs(data_kwargs: Mapping[str, Any]) -> None:
    """Validate the TOML and every data file it names; raise one StateError listing all problems."""
    toml_path = data_kwargs.get("toml_config_path")
    if not toml_path:
        raise StateError(
            "no data TOML given (data.kwargs.toml_config_path is null)",
            hint="add data.kwargs.toml_config_path=/path/to/experiment.toml",
        )
    toml_path = Path(str(toml_path)).expanduser()
    if not toml_path.is_file():
        raise StateError(
            f"data TOML not found: {toml_path} (data.kwargs.toml_config_path)", hint="check the path"
        )
    output_space = data_kwargs.get("output_space")
    if output_space not in OUTPUT_SPACES:
        raise StateError(
            f"data.kwargs.output_space={output_space!r} is not one of {', '.join(OUTPUT_SPACES)}",
            hint="data.kwargs.output_space=gene",
        )
    config = read_toml(toml_path)
    referenced = config.get_all_datasets()
    problems: list[str] = []
    if not referenced:
        problems.append("it has no [training], [zeroshot] or [fewshot] entries, so there is nothing to train on")
    undefined = sorted(referenced - set(config.datasets))
    if undefined:
        problems.append(f"dataset(s) {', '.join(undefined)} are used but have no path in [datasets]")
    facts: dict[str, list[_FileFacts]] = {}
    for name in sorted(referenced & set(config.datasets)):
        spec = str(config.datasets[name])
        files = dataset_files(spec)
        if not files:
            where = "" if Path(spec).is_absolute() else f" (relative paths are read from {Path.cwd()})"
            problems.append(f"[datasets] {name} = '{spec}' matches no .h5/.h5ad file{where}")
            continue
        facts[name] = [f for f in (_check_file(p, data_kwargs, problems) for p in files) if f is not None]
    _check_toml_entries(config, facts, problems)
    collect_errors(problems, context=f"data TOML {toml_path}")


# --------------------------------------------------------------------------------------------
# Building the data module
# --------------------------------------------------------------------------------------------


def _fast_transfer_class(base: type) -> type:
    """cell-load's data module plus two speed-ups: move only the tensors of a batch to the device, and
    serve obsm rows from memory (:mod:`state.tx.data.obsm_cache`).

    Lightning's default transfer walks every element of the batch's string lists (pert_name,
    cell_type, barcodes, ... 8192 entries each for 16 sets of 512 cells): ~170 ms per batch on CPU,
    often more than the model step itself. The lists stay on the host either way.
    """

    class StatePerturbationDataModule(base):
        def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
            from state.tx.data.fast_batch import FastBatch

            if isinstance(batch, FastBatch):  # the fast loader's: dense rows and one-hot columns made there
                return batch.to_device(device)
            if isinstance(batch, dict):
                from state.utils.device import batch_to_device

                return batch_to_device(batch, device)
            return super().transfer_batch_to_device(batch, device, dataloader_idx)

        def train_dataloader(self, test: bool = False) -> Any:
            choice = getattr(self, "_state_fast_loader", None)
            if not test and choice is not None and choice.use:
                from state.tx.data import selection

                fast = selection.train_loader(self, choice)
                if fast is not None:
                    return fast
            return leave_signals_to_parent(super().train_dataloader(test=test))

        def test_dataloader(self) -> Any:
            return leave_signals_to_parent(super().test_dataloader())

        def val_dataloader(self) -> Any:
            choice = getattr(self, "_state_fast_loader", None)
            if choice is not None and choice.use:
                from state.tx.data import selection

                fast = selection.eval_loader(self, choice)
                if fast is not None:
                    return fast
            return leave_signals_to_parent(super().val_dataloader())

        def _create_base_dataset(self, *args: Any, **kwargs: Any) -> Any:
            from state.tx.data import obsm_cache

            return obsm_cache.install(super()._create_base_dataset(*args, **kwargs))

    StatePerturbationDataModule.__qualname__ = f"State{base.__name__}"
    return StatePerturbationDataModule


def state_data_module_class(base: type | None = None) -> type:
    """Our subclass of cell-load's ``PerturbationDataModule`` (or of ``base``)."""
    if base is None:
        from cell_load.data_modules import PerturbationDataModule as base
    return _fast_transfer_class(base)


def build_data_module(data_name: str, data_kwargs: Mapping[str, Any], *, batch_size: int, cell_sentence_len: int,
                      combinations: Any = None):
    """Instantiate cell-load's data module as arc-state does (``get_datamodule``: every kwarg passed
    through, plus ``batch_size`` and ``cell_sentence_len``), with a faster batch-to-device hook.
    ``combinations`` (:class:`state.tx.combinations.Combinations`): encode labels from their parts."""
    from cell_load.utils.modules import DATA_MODULE_DICT

    if data_name not in DATA_MODULE_DICT:
        raise StateError(
            f"unknown data module data.name={data_name!r}",
            hint=f"use one of {', '.join(DATA_MODULE_DICT)} (e.g. data=perturbation)",
        )
    from state.tx.data import selection

    kwargs = {**dict(data_kwargs), "batch_size": batch_size, "cell_sentence_len": cell_sentence_len}
    choice = selection.decide(kwargs)  # the fast_loader* keys reach cell-load too: it ignores unknown kwargs
    try:
        dm = _fast_transfer_class(DATA_MODULE_DICT[data_name])(**kwargs)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise StateError(f"cell-load could not build the data module: {exc}", hint="check data.kwargs") from exc
    dm._state_fast_loader = choice
    from state.tx.combinations import apply_to_data_module

    apply_to_data_module(dm, combinations)
    return dm


def setup_data_module(dm) -> dict[str, Any]:
    """Run ``setup`` and return ``get_var_dims()``, turning cell-load failures into one-line errors."""
    try:
        dm.setup()
        if not dm.train_datasets:
            raise StateError(
                "the data TOML yields no training cells",
                hint="mark a dataset as train in [training] or add [zeroshot]/[fewshot] entries",
            )
        return dm.get_var_dims()
    except StateError:
        raise
    except (ValueError, KeyError, AssertionError, OSError) as exc:
        raise StateError(f"cell-load could not read the training data: {exc}", hint="check data.kwargs") from exc
