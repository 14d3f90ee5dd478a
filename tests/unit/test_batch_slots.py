"""Reused batch buffers of the fast loader: reused once the consumer is done, never while it holds them."""

from __future__ import annotations

import numpy as np
import torch
from test_fast_loader import _data_module, synth  # noqa: F401 - fixture

from state.tx.data.batch_slots import ReusableBuffers
from state.tx.data.split_tables import Vocabulary


def _clone(batch: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_workers_reuse_slots_and_a_kept_batch_or_slice_is_never_overwritten(synth):  # noqa: F811
    dm = _data_module(synth["toml"], synth["lay"], batch_size=2)
    expected = []
    for epoch in (0, 1):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        expected += [_clone(b) for b in loader]
    dm.num_workers = 1
    loader = dm.train_dataloader()
    got, kept_batches, kept_slices = [], [], []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            got.append(_clone(batch))
            if i == 1:
                kept_batches.append(batch)  # a consumer that keeps a whole batch
            if i == 2:
                kept_slices.append((len(got) - 1, batch["ctrl_cell_emb"][1:]))  # ... or only a view of it
            del batch
    assert len(got) == len(expected) > 6
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        assert all(torch.equal(g[k], e[k]) if isinstance(e[k], torch.Tensor) else g[k] == e[k] for k in e)
    for batch in kept_batches:
        twin = next(e for e in expected if e["pert_cell_barcode"] == batch["pert_cell_barcode"])
        assert torch.equal(batch["pert_cell_emb"], twin["pert_cell_emb"])
    for at, view in kept_slices:
        assert torch.equal(view, expected[at]["ctrl_cell_emb"][1:])
    assert 0 < len({slot for slot, _ in loader.releaser.mapped}) < len(got)  # slots were written more than once


def test_reusable_buffer_is_not_handed_out_while_held():
    pool = ReusableBuffers()
    (first, _), reused = pool.take((4, 3))
    assert not reused
    (second, _), _ = pool.take((4, 3))
    assert second is not first  # the caller still holds the first
    del second
    view = first[1:]
    del first
    (third, _), _ = pool.take((4, 3))
    assert third is pool.pool[1][0]  # the second came back; the first is held through a view
    del view, third
    assert pool.take((4, 3))[1]


def test_one_hot_rows_stay_exact_when_buffers_are_reused_or_changed_in_place():
    names = [f"p{i}" for i in range(100)]
    vocab = Vocabulary.from_map({n: torch.eye(100)[i] for i, n in enumerate(names)})
    rng = np.random.default_rng(0)
    for step in range(6):
        picks = [f"p{int(i)}" for i in rng.integers(0, 100, 16)] + ["unknown"]
        rows = vocab.rows(vocab.index_of(picks))
        expected = torch.stack([torch.eye(100)[int(p[1:])] for p in picks[:-1]] + [torch.zeros(100)])
        assert torch.equal(rows, expected)
        if step == 2:
            rows.add_(0.5)  # a consumer that changes a batch in place: the next reuse zeroes it whole
        del rows
    assert len(vocab.buffers.pool) == 1
