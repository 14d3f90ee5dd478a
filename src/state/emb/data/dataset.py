"""A map-style dataset over the cells of many h5ad files."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch.utils.data

from state.emb.data.h5_reader import H5RowReader
from state.emb.data.tables import DatasetEntry


class H5adCellDataset(torch.utils.data.Dataset):
    """Cells of the datasets of one split, in name order; item = (row, index, name, dataset_num).

    ``dataset_num`` is the dataset's position in this split's sorted list (the target of the
    dataset classifier), so train and validation numbering differ, as in arc-state.
    """

    def __init__(self, entries: Sequence[DatasetEntry], *, reader: H5RowReader | None = None) -> None:
        self.entries = sorted(entries, key=lambda e: e.name)
        self.reader = reader or H5RowReader()
        self._starts = np.cumsum([0] + [e.num_cells for e in self.entries]).tolist()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset position, row inside that dataset) of a global cell index."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        position = bisect.bisect_right(self._starts, index) - 1
        return position, index - self._starts[position]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, str, int]:
        position, row = self.locate(int(index))
        entry = self.entries[position]
        values = self.reader.read_row(entry.path, row, entry.num_genes)
        return values, int(index), entry.name, position
