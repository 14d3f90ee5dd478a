"""The run directory ``output_dir/name`` written by ``state tx train``, and its loaders.

Files with arc-state's names and contents (so arc-state can read our runs and we can read theirs):
``config.yaml``, ``data_module.torch``, ``pert_onehot_map.pt``, ``cell_type_onehot_map.torch``,
``batch_onehot_map.torch``, ``var_dims.pkl``, ``version_0/{metrics.csv,hparams.yaml}``,
``checkpoints/{best,last,final}.ckpt``.

Readable twins our own code prefers (arc-state ignores them): ``var_dims.json`` and
``vocab/{perturbations,cell_types,batches}.json`` (names in one-hot index order) and
``vocab/genes.tsv`` (output gene order). Loaders read the twins when present and fall back to
arc-state's pickles through the restricted unpickler, so old and foreign run dirs load safely.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from state.io.atomic import atomic_path, atomic_torch_save, atomic_write_text
from state.io.safe_load import safe_pickle_load, safe_torch_load
from state.utils.errors import StateError, first_line
from state.utils.plain import to_plain

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
DATA_MODULE_FILE = "data_module.torch"
VAR_DIMS_FILE = "var_dims.pkl"
VAR_DIMS_JSON = "var_dims.json"
CHECKPOINT_DIR = "checkpoints"
VOCAB_DIR = "vocab"
# kind -> (file arc-state 0.11.1 writes, older/alternative names it also reads, readable twin)
MAP_FILES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "perturbation": ("pert_onehot_map.pt", ("pert_onehot_map.torch", "pert_onehot_map.pkl"), "perturbations.json"),
    "cell_type": ("cell_type_onehot_map.torch", ("cell_type_onehot_map.pt", "cell_type_onehot_map.pkl"),
                  "cell_types.json"),
    "batch": ("batch_onehot_map.torch", ("batch_onehot_map.pt", "batch_onehot_map.pkl"), "batches.json"),
}
GENES_FILE = "genes.tsv"
# The lock a training job holds on its run directory (state.training.runlock.LOCK_FILE; a literal here
# so that reading a run directory never imports the training layer).
RUN_LOCK_FILE = ".state-run.lock"


# --------------------------------------------------------------------------------------------
# Creating the directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDirPlan:
    """What ``train`` will do with ``output_dir/name``, decided before touching the disk."""

    path: Path
    resume_from: Path | None  # last.ckpt to resume from
    delete_first: bool  # overwrite=true and the folder exists
    existed: bool


def plan_run_dir(output_dir: str | Path, name: str, *, overwrite: bool) -> RunDirPlan:
    """arc-state's semantics: overwrite deletes; otherwise an existing last.ckpt is resumed."""
    path = Path(str(output_dir)).expanduser() / str(name)
    existed = path.exists()
    if existed and not path.is_dir():
        raise StateError(f"run directory {path} exists and is a file", hint="choose another name=... or output_dir=...")
    if existed and overwrite:
        return RunDirPlan(path, None, True, True)
    last = path / CHECKPOINT_DIR / "last.ckpt"
    if last.is_file():
        return RunDirPlan(path, last, False, True)
    if existed and (path / RUN_LOCK_FILE).is_file():
        # Callers check first that no live job holds the lock: this one was left by a job killed
        # before its first checkpoint, so the folder holds only what that job wrote. Start afresh.
        log.warning("%s: a run killed before its first checkpoint; starting it again", path)
        return RunDirPlan(path, None, True, True)
    if existed and any(path.iterdir()):
        raise StateError(
            f"run directory {path} already exists and has no checkpoints/last.ckpt to resume from",
            hint="add overwrite=true to replace it, or pick another name=...",
        )
    return RunDirPlan(path, None, False, existed)


def worker_plan(output_dir: str | Path, name: str, resume_from: str | Path | None) -> RunDirPlan:
    """The plan of a non-zero DDP rank: rank 0 owns the folder and decided ``resume_from`` for every rank."""
    path = Path(str(output_dir)).expanduser() / str(name)
    return RunDirPlan(path, Path(resume_from) if resume_from else None, False, True)


def open_run_dir(plan: RunDirPlan) -> Path:
    """Apply the plan: delete the old folder if asked, then create it."""
    if plan.delete_first:
        log.info("overwrite=true: deleting %s", plan.path)
        shutil.rmtree(plan.path)
    try:
        plan.path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create run directory {plan.path}: {exc.strerror or exc}",
                         hint="choose an output_dir you can write to") from exc
    return plan.path


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_config(run_dir: Path, cfg: Any) -> Path:
    """``config.yaml``: the resolved composed config, before any code modifies it."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(cfg, resolve=True) if not isinstance(cfg, str) else cfg
    return atomic_write_text(run_dir / CONFIG_FILE, text)


def write_data_module_state(run_dir: Path, data_module: Any) -> Path:
    target = run_dir / DATA_MODULE_FILE
    with atomic_path(target) as tmp:
        data_module.save_state(str(tmp))
    return target


def write_maps(run_dir: Path, data_module: Any) -> None:
    """The three one-hot maps exactly as arc-state saves them, plus readable name lists."""
    maps = {
        "perturbation": data_module.pert_onehot_map,
        "cell_type": data_module.cell_type_onehot_map,
        "batch": data_module.batch_onehot_map,
    }
    for kind, mapping in maps.items():
        if mapping is None:
            continue
        file_name, _, twin = MAP_FILES[kind]
        atomic_torch_save(dict(mapping), run_dir / file_name)
        names = [str(k) for k in mapping]
        atomic_write_text(run_dir / VOCAB_DIR / twin, json.dumps(names, indent=1) + "\n")


def write_var_dims(run_dir: Path, var_dims: Mapping[str, Any]) -> None:
    """``var_dims.pkl`` (arc-state's pickle, numpy types kept) and ``var_dims.json`` + ``vocab/genes.tsv``."""
    with atomic_path(run_dir / VAR_DIMS_FILE) as tmp, tmp.open("wb") as fh:
        pickle.dump(dict(var_dims), fh)
    summary = {k: to_plain(v, str_keys=True) for k, v in var_dims.items() if k not in ("gene_names", "pert_names")}
    atomic_write_text(run_dir / VAR_DIMS_JSON, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    genes = [str(g) for g in var_dims.get("gene_names") or []]
    atomic_write_text(run_dir / VOCAB_DIR / GENES_FILE, "gene_name\n" + "".join(f"{g}\n" for g in genes))


# --------------------------------------------------------------------------------------------
# Reading (ours and arc-state's)
# --------------------------------------------------------------------------------------------


def refuse_se_folder(folder: str | Path) -> None:
    """A State Embedding model folder (checkpoint + protein embeddings, no config.yaml) is not a tx run."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() and any(folder.glob("protein_embeddings*.pt")):
        raise StateError(f"{folder} is a State Embedding (SE) model folder, not a tx run directory",
                         hint="use it with `state emb transform --model-folder`; pass a `state tx train` run here")


def read_config(run_dir: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise StateError(f"{path} not found: {Path(run_dir)} is not a `state tx train` run directory",
                         hint="pass the folder that holds config.yaml")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StateError(f"{path} is not valid YAML ({first_line(exc)})") from exc
    if not isinstance(cfg, dict):
        raise StateError(f"{path} does not hold a config mapping")
    return cfg


def read_data_module_state(run_dir: str | Path) -> dict[str, Any]:
    """The keyword arguments of the data module saved in ``data_module.torch`` (read safely)."""
    path = Path(run_dir) / DATA_MODULE_FILE
    if not path.is_file():
        raise StateError(f"{path} not found", hint="pass a run directory written by `state tx train`")
    state = safe_torch_load(path, what="data module state")
    if not isinstance(state, Mapping):
        raise StateError(f"{path} does not hold the data module's settings", hint="re-create the run directory")
    return dict(state)


def stored_run_dir(given: str | Path, cfg: Mapping[str, Any]) -> Path:
    """Where a run's data module and checkpoints live, as arc-state's ``predict`` finds them.

    arc-state reopens ``cfg.output_dir/cfg.name``; when that is gone (the run was moved) the
    folder given on the command line is the run.
    """
    stored = Path(str(cfg.get("output_dir", ""))) / str(cfg.get("name", ""))
    if (stored / DATA_MODULE_FILE).is_file() and (stored / CHECKPOINT_DIR).is_dir():
        return stored
    return Path(given)


def _pickled_var_dims(run_dir: Path) -> dict[str, Any] | None:
    """arc-state's ``var_dims.pkl`` as plain Python values, or None when the run has none."""
    pkl = run_dir / VAR_DIMS_FILE
    if not pkl.is_file():
        return None
    raw = safe_pickle_load(pkl, what="var_dims.pkl")
    if not isinstance(raw, dict):
        raise StateError(f"{pkl} does not hold a dict", hint="re-create the run directory")
    return {k: to_plain(v, str_keys=True) for k, v in raw.items()}


def read_var_dims(run_dir: str | Path) -> dict[str, Any]:
    """var_dims as plain Python values (ints, lists of str): our JSON twin first, else arc-state's pickle."""
    run_dir = Path(run_dir)
    twin = run_dir / VAR_DIMS_JSON
    if twin.is_file():
        dims = json.loads(twin.read_text())
        if not isinstance(dims, dict):
            raise StateError(f"{twin} should hold a JSON object", hint="re-create the run directory")
        dims["gene_names"] = read_genes(run_dir)
        dims["pert_names"] = read_vocab(run_dir, "perturbation") or []
        return dims
    pickled = _pickled_var_dims(run_dir)
    if pickled is None:
        raise StateError(f"{run_dir / VAR_DIMS_FILE} not found", hint="pass a run directory written by `state tx train`")
    return pickled


def read_genes(run_dir: str | Path) -> list[str]:
    """The output gene order: ``vocab/genes.tsv``, else var_dims.pkl's ``gene_names``, else []."""
    path = Path(run_dir) / VOCAB_DIR / GENES_FILE
    if path.is_file():
        return [line for line in path.read_text().splitlines()[1:] if line]
    pickled = _pickled_var_dims(Path(run_dir))
    return [str(g) for g in (pickled or {}).get("gene_names") or []]


def read_vocab(run_dir: str | Path, kind: str) -> list[str] | None:
    """Category names in one-hot index order: our JSON twin, else the keys of arc-state's map."""
    _, _, twin = MAP_FILES[kind]
    path = Path(run_dir) / VOCAB_DIR / twin
    if path.is_file():
        names = json.loads(path.read_text())
        if not isinstance(names, list):
            raise StateError(f"{path} should hold a JSON list of names")
        return [str(n) for n in names]
    mapping = read_map(run_dir, kind)
    return None if mapping is None else list(mapping)


def find_map_file(run_dir: str | Path, kind: str) -> Path | None:
    main, alternatives, _ = MAP_FILES[kind]
    for name in (main, *alternatives):
        path = Path(run_dir) / name
        if path.is_file():
            return path
    return None


def read_map(run_dir: str | Path, kind: str) -> dict[str, Any] | None:
    """A one-hot (or feature) map {name: float tensor}, or None when the run has no such file."""
    path = find_map_file(run_dir, kind)
    if path is None:
        return None
    raw = safe_pickle_load(path, what=path.name) if path.suffix == ".pkl" else safe_torch_load(path, what=path.name)
    if not isinstance(raw, dict):
        raise StateError(f"{path} does not hold a dict of vectors", hint="re-create the run directory")
    import torch

    return {str(k): torch.as_tensor(v, dtype=torch.float32) for k, v in raw.items()}


# The checkpoint a command reads when none is named, as in arc-state 0.11.1.
PREDICT_CHECKPOINT = "last.ckpt"
INFER_CHECKPOINT = "final.ckpt"  # also the Python API's (api.load_run)


def checkpoint_path(run_dir: str | Path, checkpoint: str | os.PathLike | None = None, *,
                    default: str = INFER_CHECKPOINT) -> Path:
    """The checkpoint file a command reads from ``run_dir``: the one rule for every command.

    ``checkpoint`` is None (the command's ``default``), a name in ``<run_dir>/checkpoints/`` with or
    without ``.ckpt`` (``final``, ``best``, ``last``, ``best-v1.ckpt``), or a path to a ``.ckpt``.
    A bare name is looked up in the run first, then in the working directory (infer's
    ``--checkpoint`` has always taken paths). One-line error listing the run's checkpoints.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    given = Path(os.fspath(checkpoint if checkpoint is not None else default))
    if len(given.parts) == 1 and not given.is_absolute():
        in_run = [folder / given.name] if given.suffix == ".ckpt" else [folder / f"{given.name}.ckpt",
                                                                         folder / given.name]
        candidates = [*in_run, given]
    else:
        candidates = [given]
    found = next((path for path in candidates if path.is_file()), None)
    if found is not None:
        return found
    present = ", ".join(sorted(p.name for p in folder.glob("*.ckpt"))) if folder.is_dir() else ""
    where = "" if candidates[0].parent == folder else f" in {folder}"
    raise StateError(f"checkpoint not found: {candidates[0]} (available{where}: {present or 'none'})",
                     hint="name one of the available checkpoints (final, best, last; .ckpt optional) "
                     "or give the path to a .ckpt file")


@dataclass
class RunDirContents:
    """Everything a run directory tells about its model's inputs and outputs."""

    path: Path
    config: dict[str, Any] | None
    var_dims: dict[str, Any]
    perturbations: list[str]
    cell_types: list[str] | None
    batches: list[str] | None
    genes: list[str]
    pert_map: dict[str, Any]
    cell_type_map: dict[str, Any] | None
    batch_map: dict[str, Any] | None


def load_run_dir(run_dir: str | Path) -> RunDirContents:
    """Read a run directory written by ``state tx train`` (ours or arc-state's) without unsafe unpickling."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StateError(f"run directory {run_dir} not found", hint="pass the folder that holds config.yaml")
    config = read_config(run_dir)
    var_dims = read_var_dims(run_dir)
    pert_map = read_map(run_dir, "perturbation")
    if pert_map is None:
        raise StateError(f"{run_dir / MAP_FILES['perturbation'][0]} not found", hint="re-create the run directory")
    return RunDirContents(
        path=run_dir,
        config=config,
        var_dims=var_dims,
        perturbations=read_vocab(run_dir, "perturbation") or list(pert_map),
        cell_types=read_vocab(run_dir, "cell_type"),
        batches=read_vocab(run_dir, "batch"),
        genes=read_genes(run_dir),
        pert_map=pert_map,
        cell_type_map=read_map(run_dir, "cell_type"),
        batch_map=read_map(run_dir, "batch"),
    )
