"""LanceDB store of SE embeddings and ``state emb query``.

Table ``state_embeddings``; one row per cell: ``vector`` (fixed-size float32 list, what LanceDB
infers from arc-state's Python lists), ``cell_id`` (obs name), ``embedding_key``, ``dataset``
(input file stem), then every obs column. Tables are only ever appended to, in one commit.
Queries run as batched vector searches (one LanceDB call per ``--batch-size`` query cells).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from state.io.atomic import atomic_path
from state.io.h5ad import open_h5ad, read_obs
from state.utils.errors import StateError, first_line
from state.utils.progress import progress

log = logging.getLogger(__name__)

TABLE_NAME = "state_embeddings"
BASE_COLUMNS = ("vector", "cell_id", "embedding_key", "dataset")
QUERY_SUFFIXES = (".csv", ".parquet")


def _lancedb():
    try:
        import lancedb
    except ImportError as exc:  # optional dependency
        raise StateError("LanceDB is not installed", hint="pip install 'state[vectordb]'") from exc
    return lancedb


# ---------------------------------------------------------------------------------------------- database paths
def check_database_path(path: str | os.PathLike, *, must_exist: bool) -> Path:
    """A LanceDB database is a folder of ``<table>.lance`` folders. Refuse anything else."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StateError(f"LanceDB path {path} is a file, not a LanceDB database folder",
                         hint="pass the database folder (created by `state emb transform --lancedb`)")
    if must_exist:
        if not path.is_dir():
            raise StateError(f"LanceDB database not found: {path}", hint="create it with `state emb transform --lancedb`")
        if not (path / f"{TABLE_NAME}.lance").is_dir():
            raise StateError(f"{path} is not a LanceDB database with a '{TABLE_NAME}' table",
                             hint="pass the folder given to `state emb transform --lancedb`")
    elif path.is_dir() and any(path.iterdir()) and not any(p.suffix == ".lance" for p in path.iterdir()):
        raise StateError(f"{path} is a non-empty folder that is not a LanceDB database (no *.lance tables)",
                         hint="pass a new or existing LanceDB folder")
    return path


# ---------------------------------------------------------------------------------------------- writing
def _obs_columns(obs: pd.DataFrame) -> pd.DataFrame:
    """obs as plain Arrow-friendly columns: categoricals -> their values, objects -> strings."""
    out = {}
    for name in obs.columns:
        if str(name) in BASE_COLUMNS:
            log.warning("obs column '%s' clashes with a LanceDB base column and is not stored", name)
            continue
        col = obs[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            col = col.astype(col.cat.categories.dtype if col.cat.categories.dtype != object else object)
        if col.dtype == object:
            col = col.map(lambda v: None if pd.isna(v) else str(v))
        out[str(name)] = col.to_numpy()
    return pd.DataFrame(out, index=obs.index)


def _obs_table(obs: pd.DataFrame):
    import pyarrow as pa

    table = pa.Table.from_pandas(_obs_columns(obs), preserve_index=False)
    return table.replace_schema_metadata(None)


def record_schema(width: int, obs: pd.DataFrame, obs_table=None):
    import pyarrow as pa

    sample = (obs_table if obs_table is not None else _obs_table(obs)).schema
    fields = [
        pa.field("vector", pa.list_(pa.float32(), width)),
        pa.field("cell_id", pa.string()),
        pa.field("embedding_key", pa.string()),
        pa.field("dataset", pa.string()),
    ]
    return pa.schema(fields + [sample.field(i).remove_metadata() for i in range(len(sample))])


def _record_batches(embeddings: np.ndarray, obs: pd.DataFrame, obs_table, schema, *, embed_key: str,
                    dataset: str, batch_size: int) -> Iterator:
    import pyarrow as pa

    width = embeddings.shape[1]
    for start in range(0, embeddings.shape[0], batch_size):
        stop = min(start + batch_size, embeddings.shape[0])
        flat = pa.array(np.ascontiguousarray(embeddings[start:stop], dtype=np.float32).reshape(-1))
        n = stop - start
        arrays = [
            pa.FixedSizeListArray.from_arrays(flat, width),
            pa.array(obs.index[start:stop].astype(str).tolist(), pa.string()),
            pa.array([embed_key] * n, pa.string()),
            pa.array([dataset] * n, pa.string()),
        ]
        arrays += [column.combine_chunks() for column in obs_table.slice(start, n).columns]
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def check_table_compatible(db_path: Path, schema) -> None:
    """Fail before any work when an existing table cannot take these records."""
    if not (db_path / f"{TABLE_NAME}.lance").is_dir():
        return
    table = _lancedb().connect(str(db_path)).open_table(TABLE_NAME)
    existing = {f.name: f.type for f in table.schema}
    ours = {f.name: f.type for f in schema}
    width = getattr(existing.get("vector"), "list_size", None)
    if width is not None and width != ours["vector"].list_size:
        raise StateError(
            f"cannot append to {db_path}/{TABLE_NAME}: it stores vectors of width {width}, this model gives "
            f"{ours['vector'].list_size}",
            hint="use a new --lancedb folder for this model, or the model whose embeddings fill the table",
        )
    missing, extra = sorted(set(existing) - set(ours)), sorted(set(ours) - set(existing))
    differ = sorted(n for n in set(existing) & set(ours) if existing[n] != ours[n])
    if missing or extra or differ:
        parts = [f"missing {missing}" if missing else "", f"extra {extra}" if extra else "",
                 f"different types {differ}" if differ else ""]
        raise StateError(
            f"cannot append to {db_path}/{TABLE_NAME}: columns do not match the table ({'; '.join(p for p in parts if p)})",
            hint="use the same obs columns and embedding width as the stored datasets, or a new --lancedb folder",
        )


def write_embeddings(db_path: str | os.PathLike, embeddings: np.ndarray, obs: pd.DataFrame, *, embed_key: str,
                     dataset: str, batch_size: int = 1000) -> int:
    """Create or append to the ``state_embeddings`` table in one commit; returns rows written."""
    import pyarrow as pa

    path = check_database_path(db_path, must_exist=False)
    obs_table = _obs_table(obs)
    schema = record_schema(embeddings.shape[1], obs, obs_table)
    check_table_compatible(path, schema)
    reader = pa.RecordBatchReader.from_batches(
        schema, _record_batches(embeddings, obs, obs_table, schema, embed_key=embed_key, dataset=dataset,
                                batch_size=max(int(batch_size), 1))
    )
    created_dir = not path.exists()
    table_dir = path / f"{TABLE_NAME}.lance"
    appending = table_dir.is_dir()
    db = _lancedb().connect(str(path))
    try:
        if appending:  # one commit: a failure leaves the table as it was
            db.open_table(TABLE_NAME).add(reader)
        else:
            db.create_table(TABLE_NAME, data=reader, schema=schema)
    except BaseException:
        if created_dir:
            shutil.rmtree(path, ignore_errors=True)
        elif not appending:
            shutil.rmtree(table_dir, ignore_errors=True)
        raise
    log.info("stored %d embeddings in %s (table %s)", embeddings.shape[0], path, TABLE_NAME)
    return int(embeddings.shape[0])


# ---------------------------------------------------------------------------------------------- query
def _query_vectors(path: Path, embed_key: str) -> tuple[pd.Index, object]:
    """obs names and the (lazily read) h5py dataset of obsm[embed_key]."""
    import h5py

    handle = open_h5ad(path)
    obsm = handle.get("obsm")
    if obsm is None or embed_key not in obsm:
        keys = list(obsm.keys()) if obsm is not None else []
        handle.close()
        raise StateError(f"{path} has no obsm['{embed_key}'] (obsm keys: {', '.join(keys) or 'none'})",
                         hint="pass --embed-key with the key `state emb transform` wrote")
    vectors = obsm[embed_key]
    if not isinstance(vectors, h5py.Dataset) or vectors.ndim != 2:
        handle.close()
        raise StateError(f"{path}: obsm['{embed_key}'] is not a dense 2-D array", hint="store a dense matrix")
    return read_obs(handle).index, (handle, vectors)


def search_batch(table, vectors: np.ndarray, *, k: int, filter: str | None) -> pd.DataFrame:
    """One batched LanceDB search; returns the rows with ``query_index`` and ``_distance``."""
    query = table.search(np.asarray(vectors, dtype=np.float32)).limit(k)
    if filter:
        query = query.where(filter)
    try:
        frame = query.to_pandas()
    except Exception as exc:  # LanceDB raises various types for bad SQL
        if not filter:
            raise
        first = first_line(exc)
        raise StateError(f"LanceDB rejected --filter {filter!r}: {first}",
                         hint="use a SQL-like expression on stored columns, e.g. cell_type = 'B cell'") from exc
    if "query_index" not in frame.columns:  # single-vector searches have no query_index
        frame.insert(0, "query_index", 0)
    return frame.sort_values(["query_index", "_distance"], kind="stable")


def query(lancedb_path, input_path, output_path, *, k: int = 3, embed_key: str = "X_state",
          exclude_distances: bool = False, filter: str | None = None, batch_size: int = 100) -> int:
    """Nearest stored cells for each query cell; writes CSV or parquet; returns the number of rows."""
    output_path = Path(output_path)
    if output_path.suffix.lower() not in QUERY_SUFFIXES:
        raise StateError(f"output {output_path} must end in .csv or .parquet", hint="change --output")
    if k < 1 or batch_size < 1:
        raise StateError("--k and --batch-size must be at least 1", hint="pass positive values")
    db_path = check_database_path(lancedb_path, must_exist=True)
    table = _lancedb().connect(str(db_path)).open_table(TABLE_NAME)
    stored = [f.name for f in table.schema if f.name != "vector"]
    width = table.schema.field("vector").type.list_size
    obs_names, (handle, vectors) = _query_vectors(Path(input_path), embed_key)
    with contextlib.closing(handle):
        if vectors.shape[1] != width:
            raise StateError(
                f"{input_path}: obsm['{embed_key}'] has width {vectors.shape[1]}, the table stores vectors of width {width}",
                hint="query with embeddings from the same SE model (and --embed-key) as the stored ones",
            )
        columns = stored + ([] if exclude_distances else ["query_distance"]) + ["query_cell_id", "query_rank"]
        with atomic_path(output_path) as tmp, _TableWriter(tmp, output_path.suffix.lower(), columns) as writer:
            total = 0
            for start in progress(range(0, vectors.shape[0], batch_size), desc="query", unit="batch"):
                block = np.asarray(vectors[start : start + batch_size])
                found = search_batch(table, block, k=k, filter=filter)
                found = found.rename(columns={"_distance": "query_distance"})
                found["query_cell_id"] = np.asarray(obs_names)[start + found["query_index"].to_numpy()]
                found["query_rank"] = found.groupby("query_index").cumcount() + 1
                writer.write(found.reindex(columns=columns))
                total += len(found)
    log.info("wrote %d neighbour rows for %d query cells to %s", total, vectors.shape[0], output_path)
    return total


class _TableWriter:
    """Incremental CSV / parquet writer (header once, no index)."""

    def __init__(self, path: Path, suffix: str, columns: list[str]) -> None:
        self.path, self.suffix, self.columns = path, suffix, columns
        self._rows_seen = False
        self._parquet = None
        self._csv_started = False

    def __enter__(self) -> _TableWriter:
        return self

    def write(self, frame: pd.DataFrame, *, allow_empty: bool = False) -> None:
        if frame.empty and not allow_empty:
            return  # an empty first batch would fix a parquet schema of null columns
        self._rows_seen = True
        if self.suffix == ".csv":
            frame.to_csv(self.path, mode="a" if self._csv_started else "w", header=not self._csv_started, index=False)
            self._csv_started = True
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        self._parquet.write_table(table.cast(self._parquet.schema))

    def __exit__(self, *exc) -> None:
        if not self._rows_seen and exc[0] is None:
            self.write(pd.DataFrame(columns=self.columns), allow_empty=True)
        if self._parquet is not None:
            self._parquet.close()
