"""The fast training loader: cell-load's split, read from the training layout as whole arrays.

cell-load still decides everything about the split (which cells train, which controls each cell may
be paired with): after ``setup()`` its training subsets and its mapping strategy's control pools are
read out and translated to layout rows (:mod:`state.tx.data.split_tables`). Batches are then built by
worker processes as arrays: the rows of each set are read run by run from the layout file straight
into a shared-memory buffer the worker reuses once the trainer is done with it (batch_slots.py); rows
of ``X`` go as CSR parts. Names, barcodes and the one-hot columns travel as codes and byte arrays; the
training process wraps it all in a :class:`~state.tx.data.fast_batch.FastBatch`, which becomes
cell-load's batch on the device (dense X rows, one-hot columns built there) and makes strings only
where something reads them. The batch has exactly the keys, shapes and dtypes of cell-load's collate
for the same settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from state.tx.data.batch_slots import SLOT_KEY, SlotBoard, SlotReleaser, WorkerSlots, batch_tensor
from state.tx.data.fast_batch import CsrRows, FastBatch, LazyStrings
from state.tx.data.layout import matrix_keys
from state.tx.data.sampler import EpochPlan, Groups, epoch_plan, set_rows
from state.tx.data.split_tables import FileTables, Vocabulary
from state.utils.worker_signals import LeaveSignalsToParent

log = logging.getLogger(__name__)


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
    shuffle: bool = True  # False: validation's order (every cell once, sets in group order)


class LayoutSetDataset(Dataset):
    """Index (epoch, batch) -> one whole training batch."""

    def __init__(self, groups: Groups, tables: list[FileTables], vocab: dict[str, Vocabulary], spec: BatchSpec,
                 rank: int = 0, world_size: int = 1) -> None:
        self.groups, self.tables, self.vocab, self.spec = groups, tables, vocab, spec
        self.rank, self.world_size = rank, world_size
        self._plan: tuple[int, EpochPlan] | None = None
        self.board: SlotBoard | None = None  # set by a loader with worker processes
        self._slots: WorkerSlots | None = None  # this worker's reusable batch buffers

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plan": None, "_slots": None, "_pending": {}}

    def _worker_slot(self) -> int:
        """A reusable slot for the next batch (in a worker process of a loader that has a board), else -1."""
        info = torch.utils.data.get_worker_info()
        if self.board is None or info is None:
            return -1
        if self._slots is None:
            self._slots = WorkerSlots(self.board, info.id)
        return self._slots.take()

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan[0] != epoch:
            s = self.spec
            self._plan = (epoch, epoch_plan(self.groups, set_len=s.set_len, windows=s.windows,
                                            batch_size=s.batch_size, seed=s.seed, epoch=epoch,
                                            drop_last=s.drop_last, rank=self.rank, world_size=self.world_size,
                                            shuffle=s.shuffle))
        return self._plan[1]

    def __len__(self) -> int:
        return self.plan(0).n_batches

    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        epoch, batch_index = index
        plan, set_len = self.plan(epoch), self.spec.set_len
        sets = plan.batch_sets(batch_index)
        n = len(sets) * set_len
        pert_rows, ctrl_rows = np.empty(n, np.int64), np.empty(n, np.int64)
        copies = []  # (destination, source) positions of redrawn rows of short sets
        for j, i in enumerate(sets.tolist()):
            at = slice(j * set_len, (j + 1) * set_len)
            pert_rows[at], ctrl_rows[at], redraws = set_rows(self.groups, plan, i, set_len, self.spec.seed, epoch)
            if redraws is not None:
                first = j * set_len + set_len - len(redraws)
                copies.append((np.arange(first, (j + 1) * set_len), j * set_len + redraws))
        dup = (np.concatenate([c[0] for c in copies]), np.concatenate([c[1] for c in copies])) if copies else None
        cell_file = np.repeat(self.groups.file[plan.group[sets]], set_len)
        return self._assemble(pert_rows, ctrl_rows, cell_file, dup, self._worker_slot())

    def _read_positions(self, n: int, dup: tuple | None) -> np.ndarray:
        if dup is None:
            return np.arange(n)
        keep = np.ones(n, bool)
        keep[dup[0]] = False
        return np.flatnonzero(keep)

    def _read(self, key: str, rows: np.ndarray, cell_file: np.ndarray, dup: tuple | None, slot: int,
              role: str) -> torch.Tensor | CsrHeader:
        """Rows of matrix ``key`` into one batch buffer (the slot's buffer for ``role`` when there is a
        slot): file reads for the distinct rows, then in-memory copies for the redrawn rows of short sets.
        A sparse matrix (``X``) goes as CSR parts: the header here, values and genes in ``role``/data and
        ``role``/indices (see :func:`_read_csr`)."""
        layout = self.tables[int(cell_file[0])].layout
        if layout.is_sparse(key):
            return self._read_csr(key, rows, cell_file, dup, slot, role)
        width = int(layout.meta["matrices"][key])
        shape = (len(rows), width)
        out = self._slots.buffer(slot, role, shape) if slot >= 0 else batch_tensor(shape)
        view = out.numpy()
        positions = self._read_positions(len(rows), dup)
        for f in np.unique(cell_file).tolist():
            at = positions[cell_file[positions] == f]
            self.tables[f].layout.read_rows(key, rows[at], view, positions=at)
        if dup is not None:
            view[dup[0]] = view[dup[1]]
        return out

    def _read_csr(self, key: str, rows: np.ndarray, cell_file: np.ndarray, dup: tuple | None, slot: int,
                  role: str) -> CsrHeader:
        """The distinct rows of the batch as CSR; redrawn rows of short sets (most rows, when groups are
        much smaller than a set) go as a row index into them (``take``), resolved on the device."""
        positions = self._read_positions(len(rows), dup)
        take = None
        if dup is not None:
            take = np.full(len(rows), -1, np.int64)
            take[positions] = np.arange(len(positions))
            take[dup[0]] = take[dup[1]]
        rows, cell_file = rows[positions], cell_file[positions]
        lengths = np.empty(len(rows), np.int64)
        files = np.unique(cell_file).tolist()
        for f in files:
            at = np.flatnonzero(cell_file == f)
            lengths[at] = self.tables[f].layout.csr(key).lengths(rows[at])
        indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        nnz = int(indptr[-1])
        parts = []
        for part in ("data", "indices"):  # both 4-byte: the slot buffers are float32, indices viewed as int32
            name = f"{role}/{part}"
            tensor = self._slots.buffer(slot, name, (nnz,)) if slot >= 0 else batch_tensor((nnz,))
            self._pending[name] = tensor
            parts.append(tensor.numpy())
        for f in files:
            at = np.flatnonzero(cell_file == f)
            self.tables[f].layout.csr(key).read(rows[at], parts[0], parts[1].view(np.int32), indptr[at])
        return CsrHeader(indptr, int(self.tables[int(cell_file[0])].layout.meta["matrices"][key]), take)

    def _codes(self, rows: np.ndarray, cell_file: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pert, ct, batch = (np.empty(len(rows), np.int64) for _ in range(3))
        for f in np.unique(cell_file).tolist():
            at = np.flatnonzero(cell_file == f)
            table = self.tables[f].layout.groups
            group = np.searchsorted(table["start"], rows[at], side="right") - 1
            files = self.tables[f]
            pert[at] = files.pert[table["pert"][group]]
            ct[at] = files.cell_type[table["cell_type"][group]]
            batch[at] = files.batch[files.layout.batch_codes()[rows[at]]]
        return pert, ct, batch

    def _assemble(self, pert_rows: np.ndarray, ctrl_rows: np.ndarray, cell_file: np.ndarray,
                  dup: tuple | None, slot: int) -> dict[str, Any]:
        s = self.spec
        pert, ct, batch = self._codes(pert_rows, cell_file)
        self._pending = {}  # CSR value buffers of this batch (role/data, role/indices)
        batch_dict: dict[str, Any] = {
            "pert_cell_emb": self._read(s.embed_key, pert_rows, cell_file, dup, slot, "pert_cell_emb"),
            "ctrl_cell_emb": self._read(s.embed_key, ctrl_rows, cell_file, None, slot, "ctrl_cell_emb"),
            # Per cell only codes cross to the training process: the vector columns (a 2,000-wide
            # one-hot per cell for pert_emb) are gathered on the device, names made when read (fast_batch.py).
            CODES: {"pert": pert, "cell_type": ct, "batch": batch},  # numpy: pickled inline
            DATASET: cell_file,
        }
        if s.pert_counts_key:
            batch_dict["pert_cell_counts"] = self._read(s.pert_counts_key, pert_rows, cell_file, dup, slot,
                                                        "pert_cell_counts")
        if s.ctrl_counts_key:
            batch_dict["ctrl_cell_counts"] = self._read(s.ctrl_counts_key, ctrl_rows, cell_file, None, slot,
                                                        "ctrl_cell_counts")
        batch_dict.update(self._pending)
        self._pending = {}
        if slot >= 0:  # buffers the trainer already has go as handles
            for role in SLOT_ROLES:
                if torch.is_tensor(batch_dict.get(role)):
                    batch_dict[role] = self._slots.outgoing(slot, role, batch_dict[role])
        if s.barcodes:
            batch_dict["pert_cell_barcode"] = self._barcodes(pert_rows, cell_file, dup)
            batch_dict["ctrl_cell_barcode"] = self._barcodes(ctrl_rows, cell_file, None)
        if slot >= 0:
            batch_dict[SLOT_KEY] = slot
        return batch_dict

    def dataset_names(self) -> np.ndarray:
        return np.array([t.dataset_name for t in self.tables], dtype=object)

    def _barcodes(self, rows: np.ndarray, cell_file: np.ndarray, dup: tuple | None) -> np.ndarray:
        """Barcodes as one fixed-width bytes array (decoded to ``str`` by :func:`finish_batch`)."""
        files = np.unique(cell_file).tolist()
        width = max(self.tables[f].layout.barcode_dtype().itemsize for f in files)
        out = np.zeros(len(rows), dtype=f"S{max(width, 1)}")
        positions = self._read_positions(len(rows), dup)
        for f in files:
            at = positions[cell_file[positions] == f]
            own = np.zeros(len(at), dtype=self.tables[f].layout.barcode_dtype())
            self.tables[f].layout.read_barcodes(rows[at], own)
            out[at] = own
        if dup is not None:
            out[dup[0]] = out[dup[1]]
        return out


class EpochBatchSampler(Sampler):
    """Yields (epoch, batch index); Lightning's ``set_epoch`` moves it to the next epoch's plan."""

    def __init__(self, dataset: LayoutSetDataset) -> None:
        self.dataset, self.epoch, self.skip = dataset, 0, 0

    def set_epoch(self, epoch: int) -> None:
        # validation keeps epoch 0's plan: the same sets and controls every time, so its losses compare
        epoch = int(epoch) if self.dataset.spec.shuffle else 0
        if epoch != self.epoch:
            self.skip = 0  # batches to skip belong to the epoch they were counted in
        self.epoch = epoch

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


CODES, DATASET = "_state_codes", "_state_dataset"  # per-cell vocabulary rows, file of each cell
MATRIX_ROLES = ("pert_cell_emb", "ctrl_cell_emb", "pert_cell_counts", "ctrl_cell_counts")
SLOT_ROLES = (*MATRIX_ROLES, *(f"{r}/{p}" for r in MATRIX_ROLES for p in ("data", "indices")))  # in slots


class CsrHeader(NamedTuple):
    """A sparse batch matrix: row pointers (values and genes travel in the ``/data`` and ``/indices`` slots)."""

    indptr: np.ndarray
    n_cols: int
    take: np.ndarray | None = None  # batch row -> CSR row (None: one CSR row per batch row)


def finish_batch(batch: dict[str, Any], dataset: LayoutSetDataset) -> FastBatch:
    """The batch a worker sent as a :class:`FastBatch` (cell-load's batch once on the device)."""
    ready, csr = {}, {}
    for role in MATRIX_ROLES:
        value = batch.get(role)
        if isinstance(value, CsrHeader):
            take = None if value.take is None else torch.from_numpy(value.take)
            csr[role] = CsrRows(torch.from_numpy(value.indptr), batch[f"{role}/indices"].view(torch.int32),
                                batch[f"{role}/data"], value.n_cols, take)
        elif value is not None:
            ready[role] = value
    for key in ("pert_cell_barcode", "ctrl_cell_barcode"):
        if key in batch:
            ready[key] = LazyStrings(batch[key])
    return FastBatch(ready, csr, batch[CODES], dataset.vocab, dataset.dataset_names(), batch[DATASET])


class LayoutDataLoader(DataLoader):
    """A DataLoader over whole batches whose place in the epoch survives a checkpoint.

    Lightning saves ``state_dict()`` in every checkpoint and, when it resumes inside an epoch, hands it
    to ``load_state_dict`` before iterating: the epoch's plan is recomputed from (seed, epoch) and the
    batches already trained on are skipped, so the resumed run sees the rest of the same epoch.
    """

    def __init__(self, dataset: LayoutSetDataset, *, num_workers: int, pin_memory: bool,
                 progress: Callable[[], int] | None = None, prefetch_factor: int = 4) -> None:
        # No DataLoader pinning (a second copy of every batch): with pin_memory the slots themselves are
        # page-locked once, in place (batch_slots.SlotReleaser), and batches go to the device from there.
        super().__init__(dataset, sampler=EpochBatchSampler(dataset), batch_size=None, collate_fn=_whole_batch,
                         num_workers=num_workers, pin_memory=False,
                         prefetch_factor=prefetch_factor if num_workers > 0 else None,
                         persistent_workers=num_workers > 0,
                         worker_init_fn=LeaveSignalsToParent(_quiet_worker) if num_workers > 0 else None)
        self.progress = progress  # batches of this epoch the trainer has processed
        # Workers write into reusable shared buffers; this process hands a slot back once its batch is gone.
        dataset.board = SlotBoard(num_workers) if num_workers > 0 else None
        self.releaser = SlotReleaser(dataset.board, page_lock=pin_memory) if num_workers > 0 else None

    def __iter__(self):
        for batch in super().__iter__():
            slot = batch.pop(SLOT_KEY, -1)
            if self.releaser is not None:
                self.releaser.receive(slot, batch, SLOT_ROLES)
            out = finish_batch(batch, self.dataset)
            roles = [k for k in SLOT_ROLES if k in batch and torch.is_tensor(batch[k])]
            del batch
            if self.releaser is not None:
                self.releaser.release_dead()
                self.releaser.track(slot, roles)
            yield out
            del out

    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else 0
        epoch = int(self.sampler.epoch)
        if done >= len(self.sampler):  # saved after the epoch's last batch: Lightning resumes in the next one
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state.get("epoch", 0)))
        self.sampler.skip = int(state.get("batches_done", 0))


def batch_spec(dm: Any, windows: int, seed: int) -> BatchSpec:
    embed, pert_counts, ctrl_counts = matrix_keys({"embed_key": dm.embed_key, "output_space": dm.output_space,
                                                   "store_raw_basal": dm.store_raw_basal})
    return BatchSpec(set_len=int(dm.cell_sentence_len), embed_key=embed, pert_counts_key=pert_counts,
                     ctrl_counts_key=ctrl_counts, barcodes=bool(dm.barcode), seed=int(seed), windows=int(windows),
                     batch_size=int(dm.batch_size), drop_last=bool(dm.drop_last))


def batch_bytes(spec: BatchSpec, table: FileTables) -> int:
    """About how many bytes one batch holds (CSR values: 8 bytes each, at the file's mean per row)."""
    meta, rows = table.layout.meta, spec.batch_size * spec.set_len
    per_row = 0
    for key in (spec.embed_key, spec.embed_key, spec.pert_counts_key, spec.ctrl_counts_key):
        if key and key in meta.get("sparse", {}):
            per_row += 8 * meta["sparse"][key]["nnz"] / max(1, table.layout.n_cells)
        elif key:
            per_row += 4 * int(meta["matrices"][key])
    return int(rows * (per_row + 64))


def prefetch_batches(budget_bytes: int, workers: int, one_batch: int) -> int:
    """Batches each worker keeps ready: the byte budget shared by the workers, between 1 and 4."""
    return max(1, min(4, int(budget_bytes) // max(1, workers * one_batch)))


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


def fast_train_loader(dm: Any, groups: Groups, tables: list[FileTables], vocab: dict[str, Vocabulary], *,
                      windows: int, seed: int, num_workers: int, prefetch_bytes: int = 256 * 2**20,
                      shuffle: bool = True) -> LayoutDataLoader:
    """The training loader (``shuffle=False``: validation's, same sampler in a fixed order, no resume state)."""
    rank, world = distributed_rank()
    spec = batch_spec(dm, windows, seed)
    spec.shuffle = shuffle
    dataset = LayoutSetDataset(groups, tables, vocab, spec, rank=rank, world_size=world)
    prefetch = prefetch_batches(prefetch_bytes, num_workers, batch_bytes(spec, tables[0]))
    pin = torch.cuda.is_available() and bool(getattr(dm, "pin_memory", True))
    return LayoutDataLoader(dataset, num_workers=num_workers, pin_memory=pin,
                            progress=_trainer_progress(dm) if shuffle else None, prefetch_factor=prefetch)
