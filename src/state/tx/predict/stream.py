"""``state tx predict --stream-adatas``: write adata_pred / adata_real batch by batch (arc-state main, PR #273).

Memory stays bounded by one batch plus the obs labels: each batch's rows go straight into
preallocated float32 HDF5 datasets (chunks of up to 1,024 rows), X clipped to [0, 14] as the
in-memory path clips it, obsm left as predicted. At the end the datasets are shrunk to the rows
written and obs / var / the empty slots are added, so the files read as ordinary h5ad files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from state.tx.predict.collect import CLIP_MAX, PredictionCollector

log = logging.getLogger(__name__)

_EMPTY_SLOTS = ("layers", "uns", "obsp", "varm", "varp")


def _attrs(node, kind: str, version: str) -> None:
    node.attrs["encoding-type"] = kind
    node.attrs["encoding-version"] = version


class StreamingH5adWriter:
    """One h5ad written row block by row block: ``write`` at a moving cursor, then ``close(obs, var)``."""

    def __init__(self, path: str | Path, n_obs: int, x_width: int, obsm_widths: dict[str, int] | None = None):
        self.n_obs, self.cursor = int(n_obs), 0
        self.file = h5py.File(path, "w")
        _attrs(self.file, "anndata", "0.1.0")
        self.x = self._dataset(self.file, "X", x_width)
        self.obsm = {}
        if obsm_widths:
            group = self.file.create_group("obsm")
            _attrs(group, "dict", "0.1.0")
            self.obsm = {key: self._dataset(group, key, width) for key, width in obsm_widths.items()}

    def _dataset(self, parent, name: str, width: int):
        chunks = (min(1024, self.n_obs) or 1, width) if self.n_obs and width else None
        data = parent.create_dataset(name, shape=(self.n_obs, width), maxshape=(self.n_obs, width),
                                     dtype=np.float32, chunks=chunks)
        _attrs(data, "array", "0.2.0")
        return data

    def write(self, x: np.ndarray, obsm: dict[str, np.ndarray] | None = None) -> None:
        """Rows ``x`` (clipped to [0, 14]) and their obsm rows (unclipped) at the cursor."""
        n = x.shape[0]
        if self.cursor + n > self.n_obs:
            raise ValueError(f"streamed rows overflow the preallocated {self.n_obs} rows (cursor {self.cursor} + {n})")
        rows = slice(self.cursor, self.cursor + n)
        self.x[rows] = np.clip(np.asarray(x, dtype=np.float32), 0.0, CLIP_MAX)
        for key, values in (obsm or {}).items():
            self.obsm[key][rows] = np.asarray(values, dtype=np.float32)
        self.cursor += n

    def close(self, obs: pd.DataFrame, var: pd.DataFrame, uns: dict | None = None) -> None:
        """Shrink to the rows written, add obs (length checked), var, uns and the empty slots."""
        from anndata.io import write_elem

        try:
            if len(obs) != self.cursor:
                raise ValueError(f"obs has {len(obs)} rows but {self.cursor} rows were streamed")
            for data in (self.x, *self.obsm.values()):
                data.resize((self.cursor, data.shape[1]))
            for slot in _EMPTY_SLOTS:
                write_elem(self.file, slot, (uns or {}) if slot == "uns" else {})
            obs = obs.copy()
            obs.index = pd.Index([str(i) for i in range(len(obs))])
            for column in obs.columns:  # as write_h5ad stores strings
                if obs[column].dtype == object:
                    obs[column] = pd.Categorical(obs[column].astype(str))
            write_elem(self.file, "obs", obs)
            write_elem(self.file, "var", var)
        finally:
            self.file.close()

    def abort(self) -> None:
        self.file.close()


class StreamingCollector(PredictionCollector):
    """A :class:`PredictionCollector` that writes matrices to two h5ad writers instead of keeping them."""

    def __init__(self, pred_path: Path, real_path: Path, *, n_obs: int, embed_key: str | None, output_space: str,
                 keep_perts: set[str] | None = None):
        super().__init__(pseudobulk=False, keep_perts=keep_perts)
        self.paths, self.n_obs, self.embed_key = (pred_path, real_path), int(n_obs), embed_key
        self.store_raw = embed_key is not None and (
            (embed_key != "X_hvg" and output_space == "gene") or output_space == "all")
        self.writers: list[StreamingH5adWriter] | None = None

    def _store(self, values: dict, keep: np.ndarray) -> None:
        sides = [(values["counts_pred"], values["preds"]), (values["counts_real"], values["real"])]
        raw = self.store_raw and all(c is not None for c, _ in sides)
        blocks = [((c if raw else v)[keep], {self.embed_key: v[keep]} if raw else {}) for c, v in sides]
        if self.writers is None:
            self.writers = [StreamingH5adWriter(path, self.n_obs, x.shape[1], {k: m.shape[1] for k, m in obsm.items()})
                            for path, (x, obsm) in zip(self.paths, blocks, strict=True)]
        for writer, (x, obsm) in zip(self.writers, blocks, strict=True):
            writer.write(x, obsm)

    def finish(self, obs: pd.DataFrame, var_for_width, uns: dict | None = None) -> None:
        """Close both files (``var_for_width(n) -> var frame``); nothing predicted still gives valid files."""
        if self.writers is None:
            self.writers = [StreamingH5adWriter(path, 0, 0) for path in self.paths]
        for writer in self.writers:
            writer.close(obs, var_for_width(writer.x.shape[1]), uns)

    def abort(self) -> None:
        for writer in self.writers or []:
            writer.abort()
