"""What makes an interrupted `emb fit` resume exactly: an epoch's order and a batch's random draws depend only on
the seed and on which epoch / which cells, never on what was drawn before (restarted, resumed, or in a worker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from state.emb.data.collator import SentenceCollator, SentenceSpec
from state.emb.data.datamodule import EpochShuffle
from state.emb.data.gene_mapping import build_dataset_genes
from state.emb.data.tables import DatasetEntry


def test_epoch_order_depends_on_seed_and_epoch_only():
    played = EpochShuffle(range(50), seed=7)
    orders = []
    for epoch in range(3):
        played.set_epoch(epoch)
        orders.append(list(played))
    fresh = EpochShuffle(range(50), seed=7)  # a resumed run's new sampler, told the epoch
    fresh.set_epoch(2)
    assert list(fresh) == orders[2] and sorted(orders[2]) == list(range(50))
    assert orders[0] != orders[1] != orders[2]
    assert list(EpochShuffle(range(50), seed=8)) != orders[0]
    assert isinstance(played, torch.utils.data.RandomSampler)  # Lightning sees shuffling (DDP: DistributedSampler)


def _collator(seed: int | None) -> SentenceCollator:
    mapping = torch.arange(30)
    entry = DatasetEntry(name="d", path=Path("d"), num_cells=4, num_genes=30)
    genes = build_dataset_genes([entry], ds_emb_mapping={"d": mapping}, valid_genes_masks=None,
                                vocab_size=40, mapping_path="m")
    return SentenceCollator(SentenceSpec(pad_length=24, P=4, N=4, S=4), genes, vocab_size=40, seed=seed)


def _batch(first: int) -> list:
    rng = np.random.default_rng(first)
    return [(rng.poisson(1.0, 30).astype(np.float32), first + i, "d", 0) for i in range(3)]


def _same(a: tuple, b: tuple) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_seeded_collator_draws_depend_on_the_batch_cells_only():
    collate = _collator(seed=42)
    torch.manual_seed(0)
    first = collate(_batch(0))
    collate(_batch(10))  # other batches collated in between, global RNG elsewhere
    torch.manual_seed(123)
    assert _same(_collator(seed=42)(_batch(0)), first) and _same(collate(_batch(0)), first)
    assert not _same(_collator(seed=43)(_batch(0)), first)
    unseeded = _collator(seed=None)  # inference (emb transform): torch's global RNG, as arc-state
    torch.manual_seed(1)
    one = unseeded(_batch(0))
    assert not _same(unseeded(_batch(0)), one)
