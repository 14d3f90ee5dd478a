"""cell-load's training split as arrays the fast loader reads with (:mod:`state.tx.data.loader`).

After cell-load's ``setup()``, its training subsets and its mapping strategy's control pools are read
out and translated to rows of the training layout (:func:`groups_from_data_module`); its name ->
vector maps (perturbation, cell type, batch) become index tables (:class:`Vocabulary`) and each
file's category codes become rows of them (:class:`FileTables`), so batches need no per-cell lookups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from state.tx.data import layout as layouts
from state.tx.data.batch_slots import ReusableBuffers
from state.tx.data.sampler import Groups


@dataclass
class Vocabulary:
    """One of cell-load's maps (name -> vector) as arrays; the last row is for names the map lacks."""

    names: np.ndarray  # object array of str, index -> name
    table: torch.Tensor  # index -> vector
    hot: torch.Tensor | None  # wide one-hot table: column of each row's 1 (filled by scatter)
    buffers: ReusableBuffers = field(default_factory=ReusableBuffers)  # for the wide one-hot batches
    devices: dict = field(default_factory=dict)  # device -> copy of table (the batch's columns are built there)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "devices": {}}

    def table_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.devices:
            self.devices[device] = self.table.to(device)
        return self.devices[device]

    @classmethod
    def from_map(cls, mapping: Any) -> Vocabulary:
        names = [str(k) for k in mapping]
        rows = [torch.as_tensor(mapping[k]).reshape(-1).float() for k in mapping]
        width = rows[0].numel() if rows else 0
        table = torch.stack([*rows, torch.zeros(width)])
        hot = one_hot_columns(table[:-1]) if width > 64 else None
        return cls(np.array([*names, ""], dtype=object), table, hot)

    def index_of(self, categories: Any) -> np.ndarray:
        """File category code -> row of this vocabulary."""
        where = {n: i for i, n in enumerate(self.names[:-1].tolist())}
        return np.array([where.get(str(c), len(self.names) - 1) for c in categories], dtype=np.int64)

    def rows(self, index: np.ndarray) -> torch.Tensor:
        if self.hot is None:
            return torch.index_select(self.table, 0, torch.from_numpy(index))
        # A wide one-hot batch is as large as the expression rows: reuse a buffer the consumer is done
        # with and clear only the ones set in it last time, unless someone changed it in place since.
        entry, reused = self.buffers.take((len(index), self.table.shape[1]))
        out = entry[0]
        if reused and entry[1][2] == out._version:
            out[entry[1][0], entry[1][1]] = 0.0
        else:
            out.zero_()
        keep = torch.from_numpy(np.flatnonzero(index < len(self.hot)))
        cols = self.hot[torch.from_numpy(index)[keep]]
        out[keep, cols] = 1.0
        entry[1] = (keep, cols, out._version)
        return out


@dataclass
class FileTables:
    """Per training file: its layout and its category codes as rows of the shared vocabularies."""

    layout: layouts.Layout
    pert: np.ndarray
    cell_type: np.ndarray
    batch: np.ndarray
    dataset_name: str


def one_hot_columns(table: torch.Tensor) -> torch.Tensor | None:
    """Column of the 1 of every row when ``table`` is a one-hot map."""
    if table.numel() == 0 or not bool(((table == 0) | (table == 1)).all()) or not bool((table.sum(1) == 1).all()):
        return None
    return table.argmax(1)


def vocabularies(dm: Any) -> dict[str, Vocabulary]:
    return {"pert": Vocabulary.from_map(dm.pert_onehot_map), "cell_type": Vocabulary.from_map(dm.cell_type_onehot_map),
            "batch": Vocabulary.from_map(dm.batch_onehot_map)}


def _file_tables(ds: Any, layout: layouts.Layout, vocab: dict[str, Vocabulary]) -> FileTables:
    cache = ds.metadata_cache
    return FileTables(layout, vocab["pert"].index_of(cache.pert_categories),
                      vocab["cell_type"].index_of(cache.cell_type_categories),
                      vocab["batch"].index_of(cache.batch_categories), str(ds.name))


def _control_pool(ds: Any, strategy: Any, split: str, ct: int, batch: int) -> list[int]:
    """The controls cell-load's mapping strategy would draw from for a cell of (ct, batch) in split."""
    if hasattr(strategy, "split_control_maps"):  # basal_mapping_strategy=batch, falls back to the cell type
        pools = strategy.split_control_maps[split]
        pool = list(pools.get((batch, ct), []))
        return pool or [i for (_, c), idx in pools.items() if c == ct for i in idx]
    return list(strategy.split_control_pool[split].get(ct, []))


def groups_from_data_module(dm: Any, layout_dir: Any = None, subsets: list | None = None
                            ) -> tuple[Groups, list[FileTables], dict]:
    """cell-load's training groups (per subset: (cell type, perturbation[, batch])) as layout rows
    (``subsets``: another split's, e.g. ``dm.val_datasets``)."""
    use_batch = dm.basal_mapping_strategy == "batch"
    files: dict[str, int] = {}
    tables: list[FileTables] = []
    vocab = vocabularies(dm)
    positions: list[np.ndarray] = []
    rows, group_file, group_pool, pools, pool_ids = [], [], [], [], {}
    for subset in dm.train_datasets if subsets is None else subsets:
        ds = subset.dataset
        key = str(ds.h5_path)
        if key not in files:
            files[key] = len(tables)
            tables.append(_file_tables(ds, layouts.open_layout(ds.h5_path, layout_dir), vocab))
            positions.append(tables[-1].layout.position_of())
        f = files[key]
        file_rows = np.asarray(ds.all_indices)[np.asarray(subset.indices, dtype=np.int64)]
        if len(file_rows) == 0:
            continue
        cache = ds.metadata_cache
        ct, pert, batch = cache.cell_type_codes[file_rows], cache.pert_codes[file_rows], cache.batch_codes[file_rows]
        keys = np.stack([ct, pert] + ([batch] if use_batch else []), axis=1)
        _, group_of = np.unique(keys, axis=0, return_inverse=True)
        group_of = group_of.reshape(-1)
        # Each group's rows in file order, by one stable sort (a mask per group is O(cells x groups)).
        by_group = file_rows[np.argsort(group_of, kind="stable")]
        for members in np.split(by_group, np.cumsum(np.bincount(group_of))[:-1]):
            first = int(members[0])
            split = ds._find_split_for_idx(first)
            pool_key = (f, split, int(cache.cell_type_codes[first]), int(cache.batch_codes[first]) if use_batch else -1)
            if pool_key not in pool_ids:
                pool = _control_pool(ds, ds.mapping_strategy, split, pool_key[2], int(cache.batch_codes[first]))
                if not pool:
                    raise LookupError(f"no control cells for cell type '{cache.cell_type_categories[pool_key[2]]}'")
                pool_ids[pool_key] = len(pools)
                pools.append(np.sort(positions[f][np.asarray(pool, dtype=np.int64)]))
            rows.append(np.sort(positions[f][members]))
            group_file.append(f)
            group_pool.append(pool_ids[pool_key])
    groups = Groups(rows, np.asarray(group_file, dtype=np.int64), np.asarray(group_pool, dtype=np.int64), pools)
    return groups, tables, vocab
