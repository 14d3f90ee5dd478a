"""The Python API of ``state``: the commands of the CLI as functions over AnnData objects.

Conventions follow scanpy: the AnnData comes first, options are keyword-only, and results are
written to a named key (``key_added``) where that applies. Every function calls the same engine
code as the matching command, so the API and the CLI give the same numbers:

======================================  ===========================================
API                                     command
======================================  ===========================================
:func:`preprocess`                      ``state tx preprocess_train``
:func:`train`                           ``state tx train``
:func:`load_run` + :meth:`Run.predict`  ``state tx infer`` (``--tsv`` via ``perturbations``)
:func:`embed`                           ``state emb transform``
:func:`build_vector_store`              ``state emb transform --lancedb``
:func:`query_vector_store`              ``state emb query``
:func:`state.heads.fit_head`            (API only) a small MLP on embeddings
:func:`combination_split`               (API only) GEARS' splits of a combinatorial screen as a TOML
======================================  ===========================================

Example on a tiny synthetic data set (raw counts, 120 cells x 40 genes):

>>> from state import api
>>> from state.datasets.synthetic import make_perturbation_adata
>>> adata = make_perturbation_adata(n_cells=120, n_genes=40, n_perts=3, seed=0)
>>> adata = api.preprocess(adata, num_hvgs=10)
>>> adata.obsm["X_hvg"].shape[0], "log1p" in adata.uns
(120, True)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from state.io.columns import DEFAULT_PERT_COL
from state.utils.errors import StateError

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

    from state.heads import Head, fit_head, load_head  # noqa: F401 - provided lazily by __getattr__
    from state.tx.infer.predictor import SetPredictor
    from state.tx.train.run import TrainResult

log = logging.getLogger(__name__)

__all__ = [
    "Head",
    "Run",
    "build_vector_store",
    "combination_split",
    "embed",
    "fit_head",
    "load_head",
    "load_run",
    "preprocess",
    "query_vector_store",
    "train",
]


# ---------------------------------------------------------------------------------------------- tx
def preprocess(adata: ad.AnnData, *, num_hvgs: int, input_is_log1p: bool = False, copy: bool = False) -> ad.AnnData:
    """Normalize, log1p and select highly variable genes, like ``state tx preprocess_train``.

    X becomes ``log1p(normalize_total(X))`` (median target), var gains ``highly_variable``,
    ``means``, ``dispersions``, ``dispersions_norm`` (Seurat flavour) and ``obsm['X_hvg']`` holds
    a dense float32 copy of the HVG columns. Works in place unless ``copy=True``; returns the
    processed AnnData either way. With ``input_is_log1p=True`` X is only checked and HVGs selected.

    >>> from state.datasets.synthetic import make_perturbation_adata
    >>> raw = make_perturbation_adata(n_cells=60, n_genes=30, n_perts=2, seed=1)
    >>> out = preprocess(raw, num_hvgs=8, copy=True)
    >>> out is raw, "X_hvg" in raw.obsm, out.obsm["X_hvg"].dtype
    (False, False, dtype('float32'))
    """
    from state.tx.preprocess import normalize_log1p_hvg

    if copy:
        adata = adata.copy()
    normalize_log1p_hvg(adata, num_hvgs=num_hvgs, input_is_log1p=input_is_log1p)
    return adata


def _hydra_value(value: Any) -> str:
    """A Python value spelled as Hydra's override grammar reads it back (strings always quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    raise StateError(f"override value {value!r} has unsupported type {type(value).__name__}",
                     hint="use None, bool, numbers, strings, paths, lists or dicts")


def override_strings(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"training.max_steps": 5, "model": "state_sm"}`` -> ``["training.max_steps=5", "model='state_sm'"]``.

    Keys keep Hydra's prefixes (``+key`` adds a key, ``~key`` deletes one). A list of
    ``key=value`` strings is passed through unchanged.

    >>> override_strings({"training.max_steps": 5, "+experiment": "demo", "data.kwargs.embed_key": None})
    ['training.max_steps=5', "+experiment='demo'", 'data.kwargs.embed_key=null']
    """
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise StateError("overrides must be a dict or a list of 'key=value' strings, not one string",
                         hint=f"write overrides=[{overrides!r}]")
    if isinstance(overrides, Mapping):
        return [key if key.startswith("~") and value is None else f"{key}={_hydra_value(value)}"
                for key, value in overrides.items()]
    return [str(item) for item in overrides]


def _load_full_config(config: Any, overrides: list[str]):
    """A complete config (mapping or YAML file, e.g. an earlier run's config.yaml) plus overrides."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, str | os.PathLike):
        path = Path(config)
        if not path.is_file():
            raise StateError(f"config file {path} not found", hint="pass a YAML file such as <run>/config.yaml")
        cfg = OmegaConf.load(path)
    elif isinstance(config, DictConfig):
        cfg = config.copy()
    elif isinstance(config, Mapping):
        cfg = OmegaConf.create(dict(config))
    else:
        raise StateError(f"config must be None, a YAML path or a mapping, got {type(config).__name__}")
    OmegaConf.set_struct(cfg, False)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or key.startswith(("~", "++")):
            raise StateError(f"override {item!r} is not supported with an explicit config",
                             hint="use key=value or +key=value")
        plain_key = key.lstrip("+")
        if not key.startswith("+") and OmegaConf.select(cfg, plain_key, default="__absent__") == "__absent__":
            raise StateError(f"unknown config key '{plain_key}' in override {item!r}",
                             hint=f"add it with +{plain_key}=... or check the spelling")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{plain_key}{item[len(key):]}"]))
    return cfg


def train(config: Any = None, *, overrides: Mapping[str, Any] | Sequence[str] | None = None) -> TrainResult:
    """Train a State Transition model, like ``state tx train``; returns a ``TrainResult``.

    ``config=None`` composes the packaged Hydra config with ``overrides`` (a dict such as
    ``{"model": "state_tiny", "training.max_steps": 100}`` or a list of ``key=value`` strings, the
    CLI's grammar). ``config`` may instead be a complete config: a mapping, a ``DictConfig`` or a
    YAML file such as an earlier run's ``config.yaml``; ``overrides`` then update its values.

    The result has ``run_dir``, ``checkpoint_paths`` (``best.ckpt``, ``last.ckpt``,
    ``final.ckpt``), ``metrics`` (last value of each logged metric) and ``global_step``. A run
    directory that already holds ``checkpoints/last.ckpt`` is resumed; ``overwrite=True`` restarts.

    Example (tiny model, 2 steps; paths relative to the repository root)::

        result = api.train(overrides={"+experiment": "demo", "training.max_steps": 2, "output_dir": "runs"})
        run = api.load_run(result.run_dir)
    """
    from state.tx.config.compose import compose_tx_config
    from state.tx.config.validate import validate_tx_config
    from state.tx.train.run import train as run_train

    strings = override_strings(overrides)
    cfg = compose_tx_config(strings) if config is None else _load_full_config(config, strings)
    validate_tx_config(cfg)
    return run_train(cfg)


@dataclass
class Run:
    """A trained tx run directory with one checkpoint loaded (see :func:`load_run`)."""

    run_dir: Path
    checkpoint: Path
    predictor: SetPredictor

    @property
    def perturbations(self) -> list[str]:
        """Perturbation names the model knows (its one-hot vocabulary)."""
        return self.predictor.pert_names

    @property
    def control_pert(self) -> str | None:
        return self.predictor.control_pert

    @property
    def embed_key(self) -> str | None:
        """The obsm key the model was trained on (None: X)."""
        return self.predictor.model_embed_key

    def predict(
        self,
        adata: ad.AnnData,
        *,
        perturbations: Mapping[str, int] | Sequence[str] | None = None,
        pert_col: str = DEFAULT_PERT_COL,
        embed_key: str | None = None,
        control_pert: str | None = None,
        celltype_col: str | None = None,
        batch_col: str | None = None,
        n_cells: int | None = None,
        seed: int = 42,
        max_set_len: int | None = None,
        quiet: bool = True,
        unknown_as_control: bool = False,
        global_control_fallback: bool = False,
    ) -> ad.AnnData:
        """Simulate perturbations on the cells of ``adata``; returns a new AnnData (the input is untouched).

        Without ``perturbations`` every cell is simulated under its own ``obs[pert_col]`` label,
        exactly as ``state tx infer``. With ``perturbations`` (a list of names, or a dict name ->
        number of cells) control cells of ``adata`` are cloned and relabelled first: ``n_cells``
        clones per name (default: as many as there are control cells), as ``infer --tsv`` does.
        The input's own cells stay in the result, controls included, so it can be scored or
        submitted as is; keep ``result[result.obs[pert_col] != run.control_pert]`` for the
        perturbed cells only. Perturbations the model does not know are refused unless
        ``unknown_as_control=True`` (then they get the control vector, as in arc-state); cell types
        without controls unless ``global_control_fallback=True`` (all controls, as in arc-state).

        Column roles have ``state tx infer``'s defaults: ``pert_col`` is ``"drugname_drugconc"``
        (pass your column, e.g. ``"gene"``), the control label comes from the run, the cell-type
        and batch columns are auto-detected. Only the features differ: they are read from
        ``obsm[embed_key]`` and the default is the key the model was trained on (``"X"`` forces
        ``.X``; the command's default is ``.X``). Predictions land where ``infer`` puts them: ``obsm[embed_key]``
        (latent), ``.X`` (gene space, clipped to [0, 14]), ``obsm['X_hvg']`` (decoded HVG
        counts) or ``obsm['X_state_pred']`` when the width differs from the input's.
        """
        from state.io.columns import ColumnChoices, resolve_columns
        from state.tx.infer import edits as infer_edits
        from state.tx.infer.run import simulate_anndata, write_predictions

        choices = ColumnChoices(pert_col=pert_col, control_pert=control_pert, celltype_col=celltype_col,
                                batch_col=batch_col, embed_key=self._embed_key(embed_key))
        columns = resolve_columns(adata, choices, self.predictor.run_columns, cli=False)
        n_controls = columns.require_controls(adata)
        cells = adata.copy()
        if perturbations is not None:
            requests = _requests(perturbations, default_cells=n_cells or n_controls)
            cells = infer_edits.pad_from_tsv(cells, requests, pert_col=columns.pert_col, control=columns.control,
                                             seed=seed)
        # the simulation step of `state tx infer`, the very same functions
        result = simulate_anndata(self.predictor, cells, columns, seed=seed, max_set_len=max_set_len, quiet=quiet,
                                  unknown_as_control=unknown_as_control, global_control_fallback=global_control_fallback)
        return write_predictions(cells, result.preds, result.counts, embed_key=columns.embed_key,
                                 output_space=self.predictor.output_space)

    def _embed_key(self, embed_key: str | None) -> str | None:
        if embed_key == "X":
            return None
        return embed_key if embed_key is not None else self.embed_key


def _requests(perturbations: Mapping[str, int] | Sequence[str], *, default_cells: int) -> list[tuple[str, int]]:
    if isinstance(perturbations, str):
        perturbations = [perturbations]
    if isinstance(perturbations, Mapping):
        requests = [(str(p), int(n)) for p, n in perturbations.items()]
    else:
        requests = [(str(p), int(default_cells)) for p in perturbations]
    negative = [p for p, n in requests if n < 0]
    if negative:
        raise StateError(f"negative cell counts requested for {', '.join(negative[:5])}")
    return requests


def load_run(run_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None) -> Run:
    """Load a tx run directory (ours or arc-state's) for prediction.

    ``checkpoint``: None for ``checkpoints/final.ckpt`` (``state tx infer``'s default), a name
    (``"best"``, ``"last.ckpt"``) in ``<run_dir>/checkpoints/``, or a path to any ``.ckpt``. Files
    are read through the restricted unpickler: nothing in them is executed.
    """
    from state.tx.infer.predictor import load_predictor

    run_dir = Path(run_dir)
    predictor = load_predictor(run_dir, checkpoint)
    return Run(run_dir=run_dir, checkpoint=predictor.checkpoint, predictor=predictor)


# ---------------------------------------------------------------------------------------------- emb
def embed(
    adata: ad.AnnData,
    *,
    model_folder: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    key_added: str = "X_state",
    seed: int | None = None,
    batch_size: int | None = None,
    gene_column: str | None = None,
    protein_embeddings: str | os.PathLike | None = None,
) -> np.ndarray:
    """Embed every cell with a State Embedding (SE) model, like ``state emb transform``.

    ``model_folder`` is a folder with a ``*.ckpt`` and ``protein_embeddings*.pt`` (e.g. SE-600M);
    ``checkpoint`` names a checkpoint file explicitly (it wins over the folder). X should hold
    raw or normalized counts with gene names in var. The embeddings (float32, one row per cell)
    are stored in ``adata.obsm[key_added]`` and returned. ``seed`` makes them bit-identical
    across runs.
    """
    from state.emb.embed import embed_anndata

    if model_folder is None and checkpoint is None:
        raise StateError("embed needs model_folder= or checkpoint=", hint="pass the SE model folder, e.g. SE-600M")
    return embed_anndata(adata, model_folder=model_folder, checkpoint=checkpoint, seed=seed, batch_size=batch_size,
                         gene_column=gene_column, protein_embeddings=protein_embeddings, embed_key=key_added)


def _obsm_matrix(adata: ad.AnnData, embed_key: str) -> np.ndarray:
    from state.io.anndata_checks import obsm_matrix

    return obsm_matrix(adata, embed_key,
                       hint="run api.embed(adata, key_added=...) first or pass embed_key=<existing key>")


def build_vector_store(
    adata: ad.AnnData,
    path: str | os.PathLike,
    *,
    embed_key: str = "X_state",
    dataset: str = "adata",
    batch_size: int = 1000,
) -> int:
    """Store ``obsm[embed_key]`` and every obs column in a LanceDB folder; returns rows written.

    The table (``state_embeddings``) is the one ``state emb transform --lancedb`` writes, so the
    CLI and this API can add to and query the same store; ``dataset`` fills its ``dataset``
    column (the CLI uses the input file's stem). Creates the folder or appends to it.
    """
    from state.emb.vectordb import write_embeddings

    return write_embeddings(path, _obsm_matrix(adata, embed_key), adata.obs, embed_key=embed_key,
                            dataset=dataset, batch_size=batch_size)


def query_vector_store(
    path: str | os.PathLike,
    adata: ad.AnnData,
    *,
    k: int = 3,
    embed_key: str = "X_state",
    filter: str | None = None,
    batch_size: int = 100,
) -> pd.DataFrame:
    """The ``k`` nearest stored cells of every cell of ``adata``, like ``state emb query``.

    Returns one row per (query cell, neighbour): the stored columns (``cell_id``,
    ``embedding_key``, ``dataset``, obs columns), ``query_distance`` (squared L2),
    ``query_cell_id`` and ``query_rank`` (1 = nearest). ``filter`` is a LanceDB where-expression
    on stored columns, e.g. ``"cell_type = 'K562'"``.
    """
    import pandas as pd

    from state.emb.vectordb import TABLE_NAME, _lancedb, check_database_path, search_batch

    if k < 1 or batch_size < 1:
        raise StateError("k and batch_size must be at least 1", hint="pass positive values")
    vectors = _obsm_matrix(adata, embed_key)
    table = _lancedb().connect(str(check_database_path(path, must_exist=True))).open_table(TABLE_NAME)
    width = table.schema.field("vector").type.list_size
    if vectors.shape[1] != width:
        raise StateError(f"obsm['{embed_key}'] has width {vectors.shape[1]}, the store holds vectors of width {width}",
                         hint="query with embeddings from the same model as the stored ones")
    stored = [f.name for f in table.schema if f.name != "vector"]
    columns = [*stored, "query_distance", "query_cell_id", "query_rank"]
    names = adata.obs_names.astype(str).to_numpy()
    parts = []
    for start in range(0, vectors.shape[0], batch_size):
        found = search_batch(table, vectors[start : start + batch_size], k=k, filter=filter)
        found = found.rename(columns={"_distance": "query_distance"})
        found["query_cell_id"] = names[start + found["query_index"].to_numpy()]
        found["query_rank"] = found.groupby("query_index").cumcount() + 1
        parts.append(found.reindex(columns=columns))
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------------------------------- combinations
def combination_split(labels: Sequence[str], *, control: str, toml: str | os.PathLike | None = None,
                      dataset: str = "screen", data_path: str | os.PathLike | None = None,
                      cell_type: str | None = None, separator: str = "+", seed: int = 0, **shares: float):
    """GEARS' held-out splits of a combinatorial screen (:mod:`state.tx.combination_splits`): returns a
    ``CombinationSplit`` (``train``/``val``/``test`` labels and each held-out label's group: seen2,
    seen1, seen0, unseen_single); with ``toml`` (and ``data_path``, ``cell_type``) also writes it as a
    cell-load TOML. ``shares``: ``test_single_share``, ``test_combination_share``, ``val_share``."""
    from state.tx.combination_splits import gears_split, write_split_toml

    split = gears_split(labels, control=control, separator=separator, seed=seed, **shares)
    if toml is not None:
        if data_path is None or cell_type is None:
            raise StateError("combination_split(toml=...) needs data_path and cell_type",
                             hint="pass data_path='screen.h5ad', cell_type='K562'")
        write_split_toml(toml, split, dataset=dataset, data_path=data_path, cell_type=cell_type)
    return split


# ---------------------------------------------------------------------------------------------- heads
def __getattr__(name: str):
    # fit_head / load_head live in state.heads (torch); importing state.api stays light.
    if name in ("fit_head", "load_head", "Head"):
        from state import heads

        return getattr(heads, name)
    raise AttributeError(f"module 'state.api' has no attribute {name!r}")

