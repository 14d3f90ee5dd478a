"""A fast-loader batch as it reaches the training process, finished on the device.

Workers send matrices (dense rows in shared-memory slots, ``X`` rows as CSR parts), and per cell only
integer codes: perturbation, cell type and batch as rows of the vocabularies, names as the same codes,
barcodes as one bytes array. :class:`FastBatch` holds that and becomes cell-load's batch in one of two
ways:

* :meth:`FastBatch.to_device` (the data module's ``transfer_batch_to_device``, i.e. every training
  step): tensors are copied to the device, CSR rows made dense there and the one-hot/feature columns
  gathered there from the vocabulary tables, so the training process builds no wide row on the host;
* item access (code that iterates the loader itself, e.g. the mean baselines' statistics pass): the
  same entries, built on the host on first use.

Names and barcodes are :class:`LazyStrings`: a sequence that makes a ``str`` only for the items read,
so a training step that never reads them costs nothing per cell.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

KEY_ORDER = ("pert_cell_emb", "ctrl_cell_emb", "pert_emb", "pert_name", "cell_type", "cell_type_onehot", "batch",
             "batch_name", "pert_cell_counts", "ctrl_cell_counts", "pert_cell_barcode", "ctrl_cell_barcode",
             "dataset_name")  # cell-load's collate order
VECTORS = {"pert_emb": "pert", "cell_type_onehot": "cell_type", "batch": "batch"}  # column -> vocabulary
NAMES = {"pert_name": "pert", "cell_type": "cell_type", "batch_name": "batch"}


class CsrRows(NamedTuple):
    """Rows of a sparse matrix: ``indptr`` (m+1, int64), ``indices`` (int32), ``data`` (float32), and
    ``take`` (int64): batch row -> one of the m rows (None: the m rows are the batch)."""

    indptr: torch.Tensor
    indices: torch.Tensor
    data: torch.Tensor
    n_cols: int
    take: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.indptr) - 1 if self.take is None else len(self.take)), int(self.n_cols)

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense float32 rows (on ``device``; values of a repeated column add up, as to_dense())."""
        device = torch.device(device) if device is not None else self.data.device
        indptr = self.indptr.to(device, non_blocking=True)
        indices = self.indices.to(device, non_blocking=True)
        data = self.data.to(device, non_blocking=True)
        n = len(indptr) - 1
        rows = torch.repeat_interleave(torch.arange(n, device=device), indptr[1:] - indptr[:-1],
                                       output_size=len(data))
        out = torch.zeros((n, self.shape[1]), dtype=torch.float32, device=device)
        out.index_put_((rows, indices.long()), data, accumulate=True)
        return out if self.take is None else out.index_select(0, self.take.to(device, non_blocking=True))


class LazyStrings(Sequence):
    """A list of str made on access: ``values[codes[i]]`` (names), or bytes decoded (barcodes)."""

    def __init__(self, codes: np.ndarray, values: np.ndarray | None = None) -> None:
        self.codes, self.values = codes, values

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):  # a list, as cell-load's
            return LazyStrings(self.codes[i], self.values).tolist()
        item = self.codes[i] if self.values is None else self.values[self.codes[i]]
        return item.decode("utf-8") if isinstance(item, bytes) else str(item)

    def __iter__(self) -> Iterator[str]:
        # in chunks: a reader that stops early (Lightning's batch-size probe takes one item) makes few strings
        for first in range(0, len(self.codes), 256):
            yield from LazyStrings(self.codes[first:first + 256], self.values).tolist()

    def tolist(self) -> list[str]:
        if self.values is not None:
            return [str(v) for v in self.values[self.codes].tolist()]
        try:
            return self.codes.astype(str).tolist()  # ASCII barcodes: one vectorised conversion
        except UnicodeDecodeError:
            return np.char.decode(self.codes, "utf-8").astype(object).tolist()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and self.tolist() == list(other)

    def __repr__(self) -> str:
        return f"LazyStrings({self.tolist()!r})"


class FastBatch(Mapping):
    """One fast-loader batch: ready tensors, CSR rows, vocabulary codes, name codes (see the module doc)."""

    def __init__(self, ready: dict[str, Any], csr: dict[str, CsrRows], codes: dict[str, np.ndarray],
                 vocab: Mapping[str, Any], dataset_names: np.ndarray, dataset_code: np.ndarray) -> None:
        self.ready, self.csr, self.codes, self.vocab = ready, csr, codes, vocab
        self.dataset_names, self.dataset_code = dataset_names, dataset_code
        present = set(ready) | set(csr) | set(VECTORS) | set(NAMES) | {"dataset_name"}
        self.keys_ = [k for k in KEY_ORDER if k in present]
        self._host: dict[str, Any] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys_:
            raise KeyError(key)
        if key not in self._host:
            self._host[key] = self._entry(key, None)
        return self._host[key]

    def _entry(self, key: str, device: torch.device | None) -> Any:
        if key in self.ready:
            value = self.ready[key]
            return value.to(device, non_blocking=True) if device is not None and torch.is_tensor(value) else value
        if key in self.csr:
            return self.csr[key].dense(device)
        if key in VECTORS:
            vocab = self.vocab[VECTORS[key]]
            codes = self.codes[VECTORS[key]]
            if device is None:
                return vocab.rows(codes)
            return vocab.table_on(device).index_select(0, torch.from_numpy(codes).to(device, non_blocking=True))
        if key in NAMES:
            return LazyStrings(self.codes[NAMES[key]], self.vocab[NAMES[key]].names)
        return LazyStrings(self.dataset_code, self.dataset_names)  # dataset_name

    def to_device(self, device: torch.device | str) -> dict[str, Any]:
        """cell-load's batch with every tensor on ``device``, the wide ones built there."""
        device = torch.device(device)
        out = {key: self._host[key] if key in self._host and not torch.is_tensor(self._host[key])
               else self._entry(key, device) for key in self.keys_}
        keep_alive(self, device)
        return out

    def host_tensors(self) -> list[torch.Tensor]:
        parts = [v for v in self.ready.values() if torch.is_tensor(v)]
        for rows in self.csr.values():
            parts += [rows.indices, rows.data]
        return parts


_IN_FLIGHT: list[tuple[Any, list[torch.Tensor]]] = []


def keep_alive(batch: FastBatch, device: torch.device) -> None:
    """Hold the host buffers of a batch until its asynchronous copies to a CUDA device are done: the
    worker rewrites a slot as soon as nothing holds its buffers (batch_slots.py)."""
    global _IN_FLIGHT
    _IN_FLIGHT = [(event, parts) for event, parts in _IN_FLIGHT if not event.query()]
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        _IN_FLIGHT.append((event, batch.host_tensors()))
