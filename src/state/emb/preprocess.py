"""``state emb preprocess``: build an SE profile from train / validation CSVs.

Writes to ``--output-dir``: ``all_embeddings_<p>.pt`` (gene -> vector; one-hot vectors over the
sorted union of genes when ``--all-embeddings`` is absent), ``ds_emb_mapping_<p>.torch``
(dataset -> global index per gene, -1 without a vector), ``valid_genes_masks_<p>.torch``,
``train_<p>.csv`` / ``val_<p>.csv`` (the readable rows plus num_cells, num_genes, groupid_for_de),
and adds ``embeddings.<p>`` / ``dataset.<p>`` to ``--config-file``. Every file is written
atomically; h5ad files are only read (headers and var, never X).
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import yaml

from state.emb.data.gene_mapping import load_gene_embeddings
from state.io.atomic import atomic_path, atomic_torch_save, atomic_write_text
from state.utils.errors import StateError

log = logging.getLogger(__name__)

CSV_COLUMNS = ("species", "path", "names")
# var fields that may hold gene names, in order of preference.
GENE_FIELDS = ("_index", "gene_name", "gene_symbols", "feature_name", "gene_id", "symbol")


@dataclass
class ScannedDataset:
    name: str
    path: str
    num_cells: int
    num_genes: int
    genes: list[str]  # upper-cased, X column order


def preprocess(
    *,
    profile_name: str,
    train_csv: str | Path,
    val_csv: str | Path,
    output_dir: str | Path,
    config_file: str | Path,
    all_embeddings: str | Path | None = None,
    num_threads: int = 1,
) -> dict[str, Path]:
    """Build the profile files and update the config; returns the paths written."""
    output_dir = Path(output_dir).resolve()
    config_file = Path(config_file)
    if not config_file.parent.is_dir():
        raise StateError(
            f"--config-file {config_file}: folder {config_file.parent} does not exist",
            hint="create it or pass --config-file <existing folder>/<name>.yaml",
        )
    vectors = None
    if all_embeddings is not None:
        loaded = load_gene_embeddings(all_embeddings, key="--all-embeddings")
        vectors = {name.upper(): vec for name, vec in loaded.items()}
    train_rows, val_rows = _read_csv(train_csv, "--train-csv"), _read_csv(val_csv, "--val-csv")
    tasks = [(str(r["names"]), str(r["path"])) for r in (*train_rows.to_dict("records"), *val_rows.to_dict("records"))]
    vocabulary = None if vectors is None else set(vectors)
    scanned = _scan_all(tasks, vocabulary, num_threads=num_threads)
    if not scanned:
        raise StateError("no dataset listed in the CSVs could be read (see the SKIPPED lines above)",
                         hint="check the path column of --train-csv / --val-csv")
    if vectors is None:
        vectors = _one_hot(sorted({g for ds in scanned.values() for g in ds.genes}))
    index = {gene: i for i, gene in enumerate(vectors)}
    mapping = {name: torch.tensor([index.get(g, -1) for g in ds.genes], dtype=torch.long)
               for name, ds in scanned.items()}
    masks = {name: m != -1 for name, m in mapping.items()}
    for name, m in mapping.items():
        missing = int((m == -1).sum())
        if missing:
            log.warning("dataset %s: %d of %d genes have no embedding", name, missing, m.numel())
    outputs = _write_outputs(profile_name, output_dir, vectors, mapping, masks, train_rows, val_rows, scanned)
    width = int(next(iter(vectors.values())).numel())
    _update_config(config_file, profile_name, outputs, size=width, num=len(vectors),
                   num_datasets=len(train_rows) + len(val_rows))
    outputs["config"] = config_file
    log.info("profile %s: %d genes of width %d, %d datasets; written to %s",
             profile_name, len(vectors), width, len(scanned), output_dir)
    log.info("train with: state emb fit --conf %s embeddings.current=%s dataset.current=%s",
             config_file, profile_name, profile_name)
    return outputs


def _read_csv(path: str | Path, flag: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{flag} {path} not found", hint="pass a CSV with columns species,path,names")
    frame = pd.read_csv(path)
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise StateError(f"{flag} {path} lacks column(s) {', '.join(missing)}",
                         hint="the CSV needs the columns species,path,names")
    return frame


def _scan_all(tasks, vocabulary, *, num_threads: int) -> dict[str, ScannedDataset]:
    if num_threads > 1:
        with ProcessPoolExecutor(max_workers=num_threads) as pool:
            results = list(pool.map(_scan_or_reason, tasks, [vocabulary] * len(tasks)))
    else:
        results = [_scan_or_reason(task, vocabulary) for task in tasks]
    scanned: dict[str, ScannedDataset] = {}
    for (name, path), result in zip(tasks, results):
        if isinstance(result, str):
            log.warning("SKIPPED: name=%s path=%s reason=%s", name, path, result)
        else:
            scanned[name] = result
    return scanned


def _scan_or_reason(task: tuple[str, str], vocabulary: set[str] | None) -> ScannedDataset | str:
    name, path = task
    try:
        return scan_h5ad(name, path, vocabulary)
    except (OSError, KeyError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def scan_h5ad(name: str, path: str, vocabulary: set[str] | None = None) -> ScannedDataset:
    """Read a file's shape and gene names (upper-cased) from its headers and ``var``."""
    with h5py.File(path, "r") as handle:
        num_cells, num_genes = _x_shape(handle["X"])
        var = handle["var"]
        index_field = var.attrs.get("_index", "_index")
        candidates = [f for f in GENE_FIELDS if (index_field if f == "_index" else f) in var]
        if not candidates:
            raise KeyError(f"var has none of {', '.join(GENE_FIELDS)}")
        columns = {f: _read_strings(var[index_field if f == "_index" else f]) for f in candidates}
    chosen = candidates[0]
    if vocabulary is not None:
        # The field whose names overlap the vocabulary most; ties go to the earlier field.
        overlaps = [len(set(columns[f]) & vocabulary) for f in candidates]
        chosen = candidates[int(np.argmax(overlaps))]
    genes = columns[chosen]
    if len(genes) != num_genes:
        raise ValueError(f"var.{chosen} has {len(genes)} names but X has {num_genes} columns")
    return ScannedDataset(name=name, path=path, num_cells=num_cells, num_genes=num_genes, genes=genes)


def _x_shape(x) -> tuple[int, int]:
    if isinstance(x, h5py.Dataset):
        return int(x.shape[0]), int(x.shape[1])
    if "shape" in x.attrs:
        shape = x.attrs["shape"]
        return int(shape[0]), int(shape[1])
    indptr, indices = x["indptr"], x["indices"]
    width = int(np.max(indices[:]) + 1) if indices.shape[0] else 0
    return int(indptr.shape[0] - 1), width


def _read_strings(node) -> list[str]:
    if isinstance(node, h5py.Group):  # categorical: categories[codes]
        categories = np.asarray([_text(c) for c in node["categories"][:]], dtype=object)
        codes = np.asarray(node["codes"][:])
        return [str(v).upper() if c >= 0 else "" for v, c in zip(categories[np.clip(codes, 0, None)], codes)]
    return [_text(v).upper() for v in node[:]]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _one_hot(genes: list[str]) -> dict[str, torch.Tensor]:
    if len(genes) > 30000:
        log.warning("building one-hot vectors for %d genes (%d x %d floats); pass --all-embeddings for "
                    "large vocabularies", len(genes), len(genes), len(genes))
    eye = torch.eye(len(genes), dtype=torch.float32)
    return {gene: eye[i].clone() for i, gene in enumerate(genes)}


def _write_outputs(profile, output_dir, vectors, mapping, masks, train_rows, val_rows, scanned):
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create --output-dir {output_dir}: {exc}") from exc
    paths = {
        "all_embeddings": output_dir / f"all_embeddings_{profile}.pt",
        "ds_emb_mapping": output_dir / f"ds_emb_mapping_{profile}.torch",
        "valid_genes_masks": output_dir / f"valid_genes_masks_{profile}.torch",
        "train": output_dir / f"train_{profile}.csv",
        "val": output_dir / f"val_{profile}.csv",
    }
    atomic_torch_save(vectors, paths["all_embeddings"])
    atomic_torch_save(mapping, paths["ds_emb_mapping"])
    atomic_torch_save(masks, paths["valid_genes_masks"])
    for split, rows in (("train", train_rows), ("val", val_rows)):
        kept = rows[rows["names"].astype(str).isin(scanned)].copy()
        kept["num_cells"] = [scanned[str(n)].num_cells for n in kept["names"]]
        kept["num_genes"] = [scanned[str(n)].num_genes for n in kept["names"]]
        kept["groupid_for_de"] = "leiden"
        with atomic_path(paths[split]) as tmp:
            kept.to_csv(tmp, index=False)
    return paths


def _update_config(config_file: Path, profile: str, paths: dict, *, size: int, num: int, num_datasets: int):
    config = {}
    if config_file.is_file():
        try:
            config = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise StateError(f"--config-file {config_file} is not valid YAML ({exc})") from exc
        if not isinstance(config, dict):
            raise StateError(f"--config-file {config_file} does not hold a mapping")
    config.setdefault("embeddings", {})[profile] = {
        "all_embeddings": str(paths["all_embeddings"]),
        "ds_emb_mapping": str(paths["ds_emb_mapping"]),
        "valid_genes_masks": str(paths["valid_genes_masks"]),
        "size": size,
        "num": num,
    }
    config.setdefault("dataset", {})[profile] = {
        "ds_type": "h5ad",
        "train": str(paths["train"]),
        "val": str(paths["val"]),
        "filter": True,
        "num_datasets": num_datasets,
    }
    atomic_write_text(config_file, yaml.safe_dump(config, sort_keys=False))
