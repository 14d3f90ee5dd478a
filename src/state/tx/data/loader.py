"""The fast training loader: cell-load's split, read from the training layout as whole arrays.

cell-load still decides everything about the split (which cells train, which controls each cell may
be paired with): after ``setup()`` its training subsets and its mapping strategy's control pools are
read out and translated to layout rows (:func:`groups_from_data_module`). Batches are then built by
worker processes as arrays: the rows of each set are copied slice by slice from the memory-mapped
layout into one preallocated tensor per batch; names are shared string objects, never per-cell dicts.
The batch has exactly the keys, shapes and dtypes of cell-load's collate for the same settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from state.tx.data import layout as layouts
from state.tx.data.sampler import EpochPlan, Groups, epoch_plan, set_rows

log = logging.getLogger(__name__)


@dataclass
class FileTables:
    """Per training file: its layout and code -> value lookups of cell-load's maps."""

    layout: layouts.Layout
    pert_names: np.ndarray  # object array: code -> name
    cell_type_names: np.ndarray
    batch_names: np.ndarray
    pert_emb: torch.Tensor  # code -> pert_onehot_map[name]
    cell_type_onehot: torch.Tensor
    batch_onehot: torch.Tensor
    dataset_name: str


def _lookup(names: np.ndarray, mapping: Any) -> torch.Tensor:
    rows = [torch.as_tensor(mapping[n]) if n in mapping else None for n in names]
    width = next((r.numel() for r in rows if r is not None), 0)
    return torch.stack([r.reshape(-1).float() if r is not None else torch.zeros(width) for r in rows])


def _file_tables(ds: Any, layout: layouts.Layout, dm: Any) -> FileTables:
    cache = ds.metadata_cache
    obj = lambda values: np.array([str(v) for v in values], dtype=object)  # noqa: E731
    perts, cts, batches = obj(cache.pert_categories), obj(cache.cell_type_categories), obj(cache.batch_categories)
    return FileTables(layout, perts, cts, batches, _lookup(perts, dm.pert_onehot_map),
                      _lookup(cts, dm.cell_type_onehot_map), _lookup(batches, dm.batch_onehot_map), str(ds.name))


def _control_pool(ds: Any, strategy: Any, split: str, ct: int, batch: int) -> list[int]:
    """The controls cell-load's mapping strategy would draw from for a cell of (ct, batch) in split."""
    if hasattr(strategy, "split_control_maps"):  # basal_mapping_strategy=batch, falls back to the cell type
        pools = strategy.split_control_maps[split]
        pool = list(pools.get((batch, ct), []))
        return pool or [i for (_, c), idx in pools.items() if c == ct for i in idx]
    return list(strategy.split_control_pool[split].get(ct, []))


def groups_from_data_module(dm: Any, layout_dir: Any = None) -> tuple[Groups, list[FileTables]]:
    """cell-load's training groups (per subset: (cell type, perturbation[, batch])) as layout rows."""
    use_batch = dm.basal_mapping_strategy == "batch"
    files: dict[str, int] = {}
    tables: list[FileTables] = []
    positions: list[np.ndarray] = []
    rows, group_file, group_pool, pools, pool_ids = [], [], [], [], {}
    for subset in dm.train_datasets:
        ds = subset.dataset
        key = str(ds.h5_path)
        if key not in files:
            files[key] = len(tables)
            tables.append(_file_tables(ds, layouts.open_layout(ds.h5_path, layout_dir), dm))
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
        for g in range(int(group_of.max()) + 1):
            members = file_rows[group_of == g]
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
    return groups, tables


@dataclass
class BatchSpec:
    """What a batch holds (cell-load's collate for these data module settings)."""

    set_len: int
    embed_key: str
    pert_counts_key: str | None  # obsm key of pert_cell_counts, None: no such entry
    ctrl_counts_key: str | None
    barcodes: bool
    seed: int
    windows: int
    batch_size: int
    drop_last: bool


class LayoutSetDataset(Dataset):
    """Index (epoch, batch) -> one whole training batch."""

    def __init__(self, groups: Groups, tables: list[FileTables], spec: BatchSpec, rank: int = 0,
                 world_size: int = 1) -> None:
        self.groups, self.tables, self.spec = groups, tables, spec
        self.rank, self.world_size = rank, world_size
        self._plan: tuple[int, EpochPlan] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plan": None}

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan[0] != epoch:
            s = self.spec
            self._plan = (epoch, epoch_plan(self.groups, set_len=s.set_len, windows=s.windows,
                                            batch_size=s.batch_size, seed=s.seed, epoch=epoch,
                                            drop_last=s.drop_last, rank=self.rank, world_size=self.world_size))
        return self._plan[1]

    def __len__(self) -> int:
        return self.plan(0).n_batches

    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        epoch, batch_index = index
        plan, s = self.plan(epoch), self.spec
        sets = plan.batch_sets(batch_index)
        n = len(sets) * s.set_len
        pert_rows = np.empty(n, np.int64)
        ctrl_rows = np.empty(n, np.int64)
        set_file = self.groups.file[plan.group[sets]]
        for j, i in enumerate(sets.tolist()):
            pert_rows[j * s.set_len:(j + 1) * s.set_len], ctrl_rows[j * s.set_len:(j + 1) * s.set_len] = set_rows(
                self.groups, plan, i, s.set_len, s.seed, epoch)
        cell_file = np.repeat(set_file, s.set_len)
        return self._assemble(pert_rows, ctrl_rows, cell_file)

    def _read(self, key: str, rows: np.ndarray, cell_file: np.ndarray) -> torch.Tensor:
        width = int(self.tables[int(cell_file[0])].layout.meta["matrices"][key])
        out = torch.empty((len(rows), width), dtype=torch.float32)
        view = out.numpy()
        for f in np.unique(cell_file).tolist():
            at = np.flatnonzero(cell_file == f)
            lay = self.tables[f].layout
            if len(at) == len(rows):
                lay.read_rows(key, rows, view)
            else:
                part = np.empty((len(at), width), np.float32)
                lay.read_rows(key, rows[at], part)
                view[at] = part
        return out

    def _codes(self, rows: np.ndarray, cell_file: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pert, ct, batch = (np.empty(len(rows), np.int64) for _ in range(3))
        for f in np.unique(cell_file).tolist():
            at = np.flatnonzero(cell_file == f)
            table = self.tables[f].layout.groups
            group = np.searchsorted(table["start"], rows[at], side="right") - 1
            pert[at], ct[at], batch[at] = table["pert"][group], table["cell_type"][group], table["batch"][group]
        return pert, ct, batch

    def _assemble(self, pert_rows: np.ndarray, ctrl_rows: np.ndarray, cell_file: np.ndarray) -> dict[str, Any]:
        s = self.spec
        pert, ct, batch = self._codes(pert_rows, cell_file)
        files = np.unique(cell_file).tolist()
        one = self.tables[files[0]] if len(files) == 1 else None

        def per_file(attr: str, codes: np.ndarray):
            if one is not None:
                values = getattr(one, attr)
                return values[torch.from_numpy(codes)] if torch.is_tensor(values) else values[codes].tolist()
            out = [getattr(self.tables[int(f)], attr)[int(c)] for f, c in zip(cell_file, codes)]
            return torch.stack(out) if torch.is_tensor(out[0]) else out

        batch_dict: dict[str, Any] = {
            "pert_cell_emb": self._read(s.embed_key, pert_rows, cell_file),
            "ctrl_cell_emb": self._read(s.embed_key, ctrl_rows, cell_file),
            "pert_emb": per_file("pert_emb", pert),
            "pert_name": per_file("pert_names", pert),
            "cell_type": per_file("cell_type_names", ct),
            "cell_type_onehot": per_file("cell_type_onehot", ct),
            "batch": per_file("batch_onehot", batch),
            "batch_name": per_file("batch_names", batch),
            "dataset_name": self._dataset_names(cell_file),
        }
        if s.pert_counts_key:
            batch_dict["pert_cell_counts"] = self._read(s.pert_counts_key, pert_rows, cell_file)
        if s.ctrl_counts_key:
            batch_dict["ctrl_cell_counts"] = self._read(s.ctrl_counts_key, ctrl_rows, cell_file)
        if s.barcodes:
            batch_dict["pert_cell_barcode"] = self._barcodes(pert_rows, cell_file)
            batch_dict["ctrl_cell_barcode"] = self._barcodes(ctrl_rows, cell_file)
        return batch_dict

    def _dataset_names(self, cell_file: np.ndarray) -> list[str]:
        names = np.array([t.dataset_name for t in self.tables], dtype=object)
        return names[cell_file].tolist()

    def _barcodes(self, rows: np.ndarray, cell_file: np.ndarray) -> list[str]:
        out = np.empty(len(rows), dtype=object)
        for f in np.unique(cell_file).tolist():
            at = np.flatnonzero(cell_file == f)
            out[at] = np.char.decode(self.tables[f].layout.read_barcodes(rows[at]), "utf-8")
        return out.tolist()


class EpochBatchSampler(Sampler):
    """Yields (epoch, batch index); Lightning's ``set_epoch`` moves it to the next epoch's plan."""

    def __init__(self, dataset: LayoutSetDataset) -> None:
        self.dataset, self.epoch, self.skip = dataset, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.dataset.plan(self.epoch).n_batches

    def __iter__(self):
        first, self.skip = self.skip, 0
        for b in range(first, len(self)):
            yield (self.epoch, b)


def _whole_batch(batch: Any) -> Any:
    return batch


def _quiet_worker(_: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


class LayoutDataLoader(DataLoader):
    """A DataLoader over whole batches whose place in the epoch survives a checkpoint.

    Lightning saves ``state_dict()`` in every checkpoint and, when it resumes inside an epoch, hands it
    to ``load_state_dict`` before iterating: the epoch's plan is recomputed from (seed, epoch) and the
    batches already trained on are skipped, so the resumed run sees the rest of the same epoch.
    """

    def __init__(self, dataset: LayoutSetDataset, *, num_workers: int, pin_memory: bool,
                 progress: Callable[[], int] | None = None) -> None:
        super().__init__(dataset, sampler=EpochBatchSampler(dataset), batch_size=None, collate_fn=_whole_batch,
                         num_workers=num_workers, pin_memory=pin_memory,
                         prefetch_factor=4 if num_workers > 0 else None, persistent_workers=num_workers > 0,
                         worker_init_fn=_quiet_worker if num_workers > 0 else None)
        self.progress = progress  # batches of this epoch the trainer has processed

    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else 0
        return {"epoch": int(self.sampler.epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state.get("epoch", 0)))
        self.sampler.skip = int(state.get("batches_done", 0))


def batch_spec(dm: Any, windows: int, seed: int) -> BatchSpec:
    embed_key = dm.embed_key
    counts_gene = dm.output_space == "gene"
    pert_counts = "X_hvg" if dm.store_raw_expression and counts_gene else None
    ctrl_counts = "X_hvg" if dm.store_raw_basal and counts_gene else None
    barcodes = bool(dm.barcode)
    return BatchSpec(set_len=int(dm.cell_sentence_len), embed_key=embed_key, pert_counts_key=pert_counts,
                     ctrl_counts_key=ctrl_counts, barcodes=barcodes, seed=int(seed), windows=int(windows),
                     batch_size=int(dm.batch_size), drop_last=bool(dm.drop_last))


def distributed_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _trainer_progress(dm: Any) -> Callable[[], int]:
    def processed() -> int:
        try:
            return int(dm.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        except (AttributeError, RuntimeError):  # not attached to a trainer
            return 0

    return processed


def fast_train_loader(dm: Any, groups: Groups, tables: list[FileTables], *, windows: int, seed: int,
                      num_workers: int) -> LayoutDataLoader:
    rank, world = distributed_rank()
    dataset = LayoutSetDataset(groups, tables, batch_spec(dm, windows, seed), rank=rank, world_size=world)
    return LayoutDataLoader(dataset, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                            progress=_trainer_progress(dm))
