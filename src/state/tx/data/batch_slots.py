"""Reusable shared-memory batch buffers for the fast loader's worker processes.

A DataLoader worker hands its batch to the training process through shared memory. A fresh segment
per batch costs more than reading the batch into it: every page of it is faulted in and zeroed in the
worker, mapped in the training process and freed again (for 2,048 cells x 2,000 float32, ~20 ms per
32 MB against ~3 ms to read the rows from the page cache). So each worker keeps a few slots, one
shared segment per matrix of a batch, and writes batch after batch into them.

A slot is written again only after the training process released it, and that process releases a
slot only when nothing uses the batch it held any more: it keeps one handle on each of the slot's
storages and waits until that handle is the storage's only user (tensors, views and numpy arrays of
it all count). A consumer that keeps a batch, or a slice of one, keeps its slot, and the worker takes
another one (or, past ``MAX_SLOTS``, fresh shared memory as before). Keeping the handle also keeps
the mapping, so a worker sends a slot's buffers once and afterwards only their shapes
(:class:`SlotTensor`): no file descriptor crosses per batch and nothing is mapped again. Slots a consumer
never saw (batches dropped in flight when an iteration is abandoned) stay taken; that costs memory up
to ``MAX_SLOTS`` per worker, never wrong data.

:class:`ReusableBuffers` applies the same rule to buffers the training process fills itself (the
wide one-hot perturbation columns, as large as the expression rows).
"""

from __future__ import annotations

import multiprocessing
import sys
from typing import Any, NamedTuple

import numpy as np
import torch

MAX_SLOTS = 12  # per worker; the DataLoader keeps prefetch_factor batches in flight, the trainer one or two
SLOT_KEY = "_state_batch_slot"  # batch entry: index of the slot the batch was written to, -1 for none


def batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """A fresh float32 batch buffer (no slot free); in a DataLoader worker it lives in shared memory from
    the start, so handing the batch to the main process copies nothing (PyTorch would copy it there)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


class SlotBoard:
    """One shared byte per (worker, slot): 1 while the slot holds a batch the trainer may still use.

    ``by_handle``: the trainer keeps each slot's buffers mapped, so a worker may send a buffer it sent
    before as a :class:`SlotTensor`. Off when the DataLoader pins batches (its pinning thread needs
    the tensors themselves).
    """

    def __init__(self, workers: int, *, by_handle: bool = True) -> None:
        self.flags = multiprocessing.RawArray("b", max(int(workers), 1) * MAX_SLOTS)
        self.by_handle = by_handle


class SlotTensor(NamedTuple):
    """A batch matrix in a slot buffer the training process already has: only its shape is sent."""

    shape: tuple[int, ...]


class WorkerSlots:
    """The slots of one worker process (created there, never pickled)."""

    def __init__(self, board: SlotBoard, worker: int) -> None:
        self.board, self.first = board, int(worker) * MAX_SLOTS
        self.storages: list[dict[str, torch.UntypedStorage]] = []
        self.sent: dict[tuple[int, str], torch.UntypedStorage] = {}  # buffers the trainer has been sent

    def take(self) -> int:
        """A free slot (its board index), marked taken; -1 when all ``MAX_SLOTS`` are taken."""
        flags = self.board.flags
        for i in range(len(self.storages)):
            if flags[self.first + i] == 0:
                flags[self.first + i] = 1
                return self.first + i
        if len(self.storages) == MAX_SLOTS:
            return -1
        self.storages.append({})
        flags[self.first + len(self.storages) - 1] = 1
        return self.first + len(self.storages) - 1

    def buffer(self, slot: int, role: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The slot's float32 buffer for one matrix of the batch, grown when a batch is larger."""
        nbytes = int(np.prod(shape)) * 4
        own = self.storages[slot - self.first]
        storage = own.get(role)
        if storage is None or storage.nbytes() < nbytes:
            storage = own[role] = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)

    def outgoing(self, slot: int, role: str, tensor: torch.Tensor) -> torch.Tensor | SlotTensor:
        """What to put in the batch for ``tensor`` (a slot buffer): a handle once the trainer has it."""
        storage = self.storages[slot - self.first][role]
        if self.board.by_handle and self.sent.get((slot, role)) is storage:
            return SlotTensor(tuple(tensor.shape))
        self.sent[(slot, role)] = storage
        return tensor


def storage_users(storage: torch.UntypedStorage) -> int | None:
    """How many tensors and storage handles share ``storage``; None where this torch cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(storage._cdata))


class SlotReleaser:
    """In the training process: frees a batch's slot once nothing but this object uses its storages."""

    def __init__(self, board: SlotBoard, *, page_lock: bool = False) -> None:
        self.board, self.page_lock = board, page_lock
        self.mapped: dict[tuple[int, str], torch.UntypedStorage] = {}  # (slot, role) -> its one handle here
        self.pending: list[tuple[int, list[torch.UntypedStorage]]] = []  # slots handed out, not yet released

    def _keep(self, key: tuple[int, str], storage: torch.UntypedStorage) -> None:
        """Keep ``storage`` mapped; with ``page_lock`` it is registered with CUDA once (copies from it
        to the GPU are then asynchronous DMA, with no pinned second copy of the batch)."""
        old = self.mapped.get(key)
        if old is not None and old.data_ptr() == storage.data_ptr():
            return
        if self.page_lock:
            if old is not None:
                _host_register(old, False)
            _host_register(storage, True)
        self.mapped[key] = storage

    def receive(self, slot: int, batch: dict[str, Any], roles: tuple[str, ...]) -> None:
        """Turn the :class:`SlotTensor` entries of a batch that arrived in ``slot`` back into tensors on
        the buffers this process keeps, and keep the buffers that arrived as tensors."""
        if slot < 0:
            return
        for role in roles:
            value = batch.get(role)
            if isinstance(value, SlotTensor):
                batch[role] = torch.empty(0, dtype=torch.float32).set_(self.mapped[(slot, role)], 0, value.shape)
            elif torch.is_tensor(value):
                self._keep((slot, role), value.untyped_storage())

    def track(self, slot: int, roles: list[str]) -> None:
        """The batch of ``slot`` (its ``roles`` buffers) was handed to the consumer."""
        storages = [self.mapped[(slot, role)] for role in roles] if slot >= 0 else []
        if not storages or storage_users(storages[0]) is None:
            return  # cannot tell when the batch is gone: the slot stays taken (the worker takes others)
        self.pending.append((slot, storages))

    def release(self, slot: int) -> None:
        """Free ``slot`` now (its batch was copied, e.g. into pinned memory)."""
        if slot >= 0:
            self.board.flags[slot] = 0

    def release_dead(self) -> None:
        busy = []
        for slot, storages in self.pending:
            if all(storage_users(s) == 1 for s in storages):  # only this object's handle is left
                self.board.flags[slot] = 0
            else:
                busy.append((slot, storages))
        self.pending = busy


def _host_register(storage: torch.UntypedStorage, register: bool) -> None:
    """Page-lock (or release) a shared-memory buffer in place; nothing when CUDA refuses (copies stay
    synchronous then, results are the same)."""
    if storage.nbytes() == 0:
        return
    cudart = torch.cuda.cudart()
    if register:
        cudart.cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0)
    else:
        cudart.cudaHostUnregister(storage.data_ptr())


class ReusableBuffers:
    """float32 buffers of one shape, handed out again once the caller's last use of them is gone.

    The pool keeps each buffer; a buffer is free when the pool's reference is the only one to the
    tensor and its storage (the counts are calibrated once on a probe, as they differ between Python
    versions). ``take`` returns the buffer and what the caller stored with it last time, so a
    one-hot buffer only needs the previous ones cleared instead of being zeroed whole.
    """

    LIMIT = 8

    def __init__(self) -> None:
        self.pool: list[list] = []  # [tensor, note]
        self._free_counts = self._counts([torch.empty(1), None])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pool": []}  # workers never fill these; do not ship them

    @staticmethod
    def _counts(entry: list) -> tuple[int, int | None]:
        return sys.getrefcount(entry[0]), storage_users(entry[0].untyped_storage())

    def take(self, shape: tuple[int, ...]) -> tuple[list, bool]:
        """An entry ``[tensor, note]`` of this shape and whether it is a reused one (note as left)."""
        if self._free_counts[1] is not None:
            for entry in self.pool:
                if tuple(entry[0].shape) == shape and self._counts(entry) == self._free_counts:
                    return entry, True
        entry = [torch.empty(shape, dtype=torch.float32), None]
        if len(self.pool) < self.LIMIT:
            self.pool.append(entry)
        return entry, False
