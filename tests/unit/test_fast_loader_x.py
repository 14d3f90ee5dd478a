"""The full gene matrix X on the fast loader: laid out sparse, densified on the device, equal to cell-load's rows."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from helpers.synthetic import make_processed_dataset, write_toml
from state.tx.data import layout as layouts
from state.tx.data import layout_csr
from state.tx.data.fast_batch import FastBatch, LazyStrings
from state.tx.data.module import build_data_module, setup_data_module
from state.tx.data.selection import FastLoaderChoice, needed_keys
from state.utils.errors import StateError

COLUMNS = {"pert_col": "gene", "cell_type_key": "cell_type", "batch_col": "gem_group"}


def _dataset(tmp_path: Path, dense_gzip: bool = False) -> tuple[Path, Path]:
    data = make_processed_dataset(tmp_path / "data", n_cells=240, n_genes=30, n_hvgs=12, n_perts=4, n_celltypes=2,
                                  seed=2)
    if dense_gzip:  # X stored dense and compressed: laid out as CSR all the same
        adata = ad.read_h5ad(data)
        adata.X = np.asarray(adata.X.todense())
        adata.write_h5ad(data, compression="gzip")
    return data, write_toml(tmp_path / "split.toml", dataset_name="s", data_path=data, kind="mixed")


def _data_module(toml: Path, lay: Path, **kw):
    kwargs = {**COLUMNS, "toml_config_path": str(toml), "control_pert": "non-targeting", "num_workers": 0,
              "barcode": True, "fast_loader": "true", "fast_loader_dir": str(lay), **kw}
    layouts.index_toml(toml, keys=needed_keys(kwargs), layout_dir=lay, **COLUMNS)
    dm = build_data_module("PerturbationDataModule", kwargs, batch_size=3, cell_sentence_len=8)
    setup_data_module(dm)
    return dm


CASES = [  # (embed_key, output_space, store_raw_basal, X dense+gzip)
    (None, "all", True, False),
    (None, "all", False, True),
    ("X_hvg", "all", True, False),
    ("X_hvg", "gene", True, False),
]


@pytest.mark.parametrize(("embed_key", "space", "raw_basal", "dense"), CASES)
def test_batch_equals_cell_loads_rows_for_the_same_cells(tmp_path, embed_key, space, raw_basal, dense):
    data, toml = _dataset(tmp_path, dense)
    dm = _data_module(toml, tmp_path / "lay", embed_key=embed_key, output_space=space, store_raw_basal=raw_basal)
    raw = next(iter(dm.train_dataloader()))
    assert isinstance(raw, FastBatch) and (embed_key is not None or raw.csr)  # X travels sparse
    fast = dm.transfer_batch_to_device(raw, torch.device("cpu"), 0)
    dm._state_fast_loader = FastLoaderChoice(False)
    slow = next(iter(dm.train_dataloader()))
    assert list(fast) == [k for k in fast if k in slow] and set(fast) == set(slow)
    for key, value in slow.items():
        if torch.is_tensor(value):
            assert fast[key].shape == value.shape and fast[key].dtype == value.dtype, key
            assert torch.equal(raw[key], fast[key]), key  # read on the host: the same batch
    ds = dm.train_datasets[0].dataset  # cell-load's own per-cell reads are the reference
    names = [b.decode() for b in h5py.File(data, "r")["obs/_index"][:]]
    row_of = {n: i for i, n in enumerate(names)}

    def reference(cell: int, key: str) -> torch.Tensor:
        return ds.fetch_gene_expression(cell) if key == "X" else ds.fetch_obsm_expression(cell, key)

    embed = embed_key or "X"
    counts = "X" if space == "all" else "X_hvg"
    for i, (p, c) in enumerate(zip(fast["pert_cell_barcode"], fast["ctrl_cell_barcode"])):
        assert torch.equal(fast["pert_cell_emb"][i], reference(row_of[p], embed))
        assert torch.equal(fast["ctrl_cell_emb"][i], reference(row_of[c], embed))
        if "pert_cell_counts" in slow:
            assert torch.equal(fast["pert_cell_counts"][i], reference(row_of[p], counts))
        if raw_basal:
            assert torch.equal(fast["ctrl_cell_counts"][i], reference(row_of[c], counts))
        assert torch.equal(fast["pert_emb"][i], dm.pert_onehot_map[fast["pert_name"][i]])
    assert fast["pert_cell_emb"].abs().sum() > 0


def test_x_layout_equals_the_permuted_matrix_in_small_buckets(tmp_path, monkeypatch):
    monkeypatch.setattr(layout_csr, "CHUNK_VALUES", 37)  # many chunks, each spread over many buckets
    monkeypatch.setattr(layout_csr, "BUCKET_VALUES", 53)
    matrix = sp.random(211, 40, density=0.2, format="csr", random_state=1, dtype=np.float64)
    order = np.random.default_rng(0).permutation(211)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(211)
    for dense in (False, True):
        folder = tmp_path / str(dense)
        folder.mkdir()
        with h5py.File(folder / "a.h5", "w") as fh:
            if dense:
                fh.create_dataset("X", data=matrix.toarray(), compression="gzip")
            else:
                group = fh.create_group("X")
                group.attrs.update({"encoding-type": "csr_matrix", "shape": matrix.shape})
                group["data"], group["indices"], group["indptr"] = matrix.data, matrix.indices, matrix.indptr
        with h5py.File(folder / "a.h5", "r") as fh:
            assert layout_csr.write_x(fh, folder, order, inverse)[0] == 40
        parts = [np.fromfile(folder / f"X.{n}", dtype=d) for n, d in
                 zip(layout_csr.FILES, (np.float32, np.int32, np.int64))]
        written = sp.csr_matrix(tuple(parts), shape=matrix.shape).toarray()
        np.testing.assert_array_equal(written, matrix.toarray().astype(np.float32)[order])
        rows = np.array([3, 4, 5, 100, 101, 7, 7])
        lengths = layout_csr.CsrReader(folder).lengths(rows)
        data, genes = np.empty(lengths.sum(), np.float32), np.empty(lengths.sum(), np.int32)
        layout_csr.CsrReader(folder).read(rows, data, genes, np.r_[0, np.cumsum(lengths)[:-1]])
        got = sp.csr_matrix((data, genes, np.r_[0, np.cumsum(lengths)]), shape=(7, 40)).toarray()
        np.testing.assert_array_equal(got, written[rows])


def test_names_are_made_only_when_read():
    names = LazyStrings(np.array([2, 0, 2]), np.array(["a", "b", "c"], dtype=object))
    assert len(names) == 3 and names[0] == "c" and names[1:] == ["a", "c"] and list(names) == ["c", "a", "c"]
    barcodes = LazyStrings(np.array([b"AC", "é".encode()], dtype="S2"))
    assert barcodes == ["AC", "é"] and barcodes != ["AC"]


# ------------------------------------------------------------------ bad layouts: one line, the fix named


def _error(toml: Path, lay: Path, **kw) -> str:
    kwargs = {**COLUMNS, "toml_config_path": str(toml), "control_pert": "non-targeting", "num_workers": 0,
              "fast_loader": "true", "fast_loader_dir": str(lay), "embed_key": None, "output_space": "all", **kw}
    with pytest.raises(StateError) as info:
        build_data_module("PerturbationDataModule", kwargs, batch_size=3, cell_sentence_len=8)
    return info.value.one_line()


def test_bad_layouts_each_give_one_line_with_the_index_command(tmp_path):
    data, toml = _dataset(tmp_path)
    lay = tmp_path / "lay"
    layouts.index_toml(toml, keys=["X_hvg"], layout_dir=lay, **COLUMNS)
    line = _error(toml, lay)  # output_space=all needs X in the layout
    assert "lacks the gene matrix X" in line and "state tx index" in line and "--keys X" in line
    layouts.index_toml(toml, keys=["X"], layout_dir=lay, **{**COLUMNS, "pert_col": "cell_type"})
    line = _error(toml, lay)  # sorted for another config
    assert "sorted by columns" in line and "--pert-col gene" in line
    folder = layouts.index_toml(toml, keys=["X"], layout_dir=lay, **COLUMNS)[0]
    with h5py.File(data, "a") as fh:
        fh["uns"].attrs["touched"] = 1
    assert "stale" in _error(toml, lay) and "state tx index" in _error(toml, lay)
    layouts.index_toml(toml, keys=["X"], layout_dir=lay, **COLUMNS)
    with (folder / "X.data.f32").open("r+b") as fh:
        fh.truncate(100)
    for mode in ("true", "auto"):  # a broken copy is refused whatever the mode
        line = _error(toml, lay, fast_loader=mode)
        assert "X.data.f32" in line and "truncated" in line and "state tx index" in line and "\n" not in line


def test_workers_send_the_same_sparse_batches_through_their_slots(tmp_path):
    _, toml = _dataset(tmp_path)
    dm = _data_module(toml, tmp_path / "lay", embed_key=None, output_space="all", store_raw_basal=True)
    cpu = torch.device("cpu")
    raw = list(dm.train_dataloader())
    assert any(b.csr["pert_cell_emb"].take is not None for b in raw)  # short sets: redrawn rows sent as an index
    plain = [dm.transfer_batch_to_device(b, cpu, 0) for b in raw]
    for batch in plain:  # each batch row is its barcode's row of X
        by_cell = dict(zip(batch["pert_cell_barcode"], batch["pert_cell_emb"]))
        assert all(torch.equal(by_cell[c], row) for c, row in zip(batch["pert_cell_barcode"], batch["pert_cell_emb"]))
    dm.num_workers = 2
    loader = dm.train_dataloader()
    for _ in range(2):  # the second epoch reuses the slots (buffers sent by handle)
        held = [dm.transfer_batch_to_device(b, cpu, 0) for b in loader]
        assert len(held) == len(plain)
        for a, b in zip(held, plain):
            for key in ("pert_cell_emb", "ctrl_cell_emb", "ctrl_cell_counts", "pert_emb"):
                assert torch.equal(a[key], b[key]), key
            assert a["pert_cell_barcode"] == b["pert_cell_barcode"]


def test_validation_runs_on_the_layout_in_order_with_every_cell_once(tmp_path):
    from collections import Counter

    from state.tx.data.loader import LayoutDataLoader

    _, toml = _dataset(tmp_path)
    dm = _data_module(toml, tmp_path / "lay", embed_key="X_hvg", output_space="all")
    val = dm.val_dataloader()
    assert isinstance(val, LayoutDataLoader)
    first = [b["pert_cell_barcode"].tolist() for b in val]
    assert first == [b["pert_cell_barcode"].tolist() for b in dm.val_dataloader()]  # no shuffling
    val.sampler.set_epoch(3)
    assert first == [b["pert_cell_barcode"].tolist() for b in val]
    cells = Counter(c for batch in first for c in batch)
    expected = {str(s.dataset.cell_barcodes[i]) for s in dm.val_datasets for i in s.indices}
    assert set(cells) == expected  # every validation cell, nothing else
    dm._state_fast_loader = FastLoaderChoice(False)
    slow = Counter(g for b in dm.val_dataloader() for g in zip(b["cell_type"], b["pert_name"]))
    fast = Counter(g for b in val for g in zip(b["cell_type"], b["pert_name"]))
    assert fast == slow  # the same sets per group as cell-load's validation loader
