"""The training layout and the fast set loader: same split, same cells, same batch format as cell-load."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers.synthetic import make_processed_dataset, write_toml
from state.tx.data import layout as layouts
from state.tx.data.module import build_data_module, setup_data_module
from state.tx.data.sampler import Groups, epoch_plan, part_sizes, set_rows
from state.tx.data.selection import FastLoaderChoice
from state.tx.data.split_tables import groups_from_data_module
from state.utils.errors import StateError

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DATA = ROOT / "tests" / "data" / "fixtures" / "tx" / "state_llama" / "data" / "processed"
BASE = {"embed_key": "X_hvg", "output_space": "gene", "pert_col": "gene", "cell_type_key": "cell_type",
        "batch_col": "gem_group", "control_pert": "non-targeting", "num_workers": 0, "barcode": True}


def _data_module(toml: Path, layout_dir: Path, *, set_len: int = 8, batch_size: int = 3, **extra):
    kw = {**BASE, "toml_config_path": str(toml), "fast_loader": "true", "fast_loader_dir": str(layout_dir), **extra}
    dm = build_data_module("PerturbationDataModule", kw, batch_size=batch_size, cell_sentence_len=set_len)
    setup_data_module(dm)
    return dm


def _cell_load_loader(dm):
    dm._state_fast_loader = FastLoaderChoice(False)
    return dm.train_dataloader()


def _index(toml: Path, layout_dir: Path, **columns) -> list[Path]:
    cols = {"pert_col": "gene", "cell_type_key": "cell_type", "batch_col": "gem_group", **columns}
    return layouts.index_toml(toml, keys=["X_hvg"], layout_dir=layout_dir, seed=3, **cols)


@pytest.fixture
def synth(tmp_path):
    data = make_processed_dataset(tmp_path / "data", n_cells=300, n_genes=30, n_hvgs=12, n_perts=5, n_celltypes=3,
                                  seed=1)
    toml = write_toml(tmp_path / "split.toml", dataset_name="s", data_path=data, kind="mixed")
    _index(toml, tmp_path / "lay")
    return {"data": data, "toml": toml, "lay": tmp_path / "lay"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ layout


def test_layout_is_group_sorted_copy_and_rewrite_is_repeatable(synth):
    before = _sha(synth["data"])
    lay = layouts.open_layout(synth["data"], synth["lay"])
    with h5py.File(synth["data"], "r") as fh:
        source = fh["obsm/X_hvg"][:]
        codes = [layouts.read_codes(fh, c) for c in ("cell_type", "gem_group", "gene")]
    np.testing.assert_array_equal(np.asarray(lay.matrix("X_hvg")), source[lay.order])
    assert sorted(lay.order.tolist()) == list(range(len(source)))
    table = lay.groups
    assert table["start"][0] == 0 and table["stop"][-1] == len(source)
    for g in range(len(table["start"])):
        rows = lay.order[table["start"][g]:table["stop"][g]]
        for col, name in zip(codes, ("cell_type", "batch", "pert")):
            assert name == "batch" or set(col[rows].tolist()) == {int(table[name][g])}
    np.testing.assert_array_equal(lay.batch_codes(), codes[1][lay.order])
    keys = list(zip(table["cell_type"].tolist(), table["pert"].tolist()))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)  # sorted, one run per group
    again = layouts.index_toml(synth["toml"], keys=["X_hvg"], layout_dir=synth["lay"], seed=3, pert_col="gene",
                               cell_type_key="cell_type", batch_col="gem_group")
    np.testing.assert_array_equal(layouts.open_layout(synth["data"], synth["lay"]).order, lay.order)
    assert [p.name for p in synth["lay"].iterdir()] == [again[0].name]  # no temp folders left behind
    assert _sha(synth["data"]) == before  # the source stays untouched


def test_layout_rewrite_in_buckets_equals_the_plain_permutation(tmp_path, monkeypatch):
    # Small chunks and buckets: many source chunks, each spread over many buckets, a short last bucket.
    monkeypatch.setattr(layouts, "CHUNK_BYTES", 7 * 12 * 4)
    monkeypatch.setattr(layouts, "BUCKET_BYTES", 5 * 12 * 4)
    source = np.random.default_rng(0).random((103, 12), dtype=np.float32)
    with h5py.File(tmp_path / "m.h5", "w") as fh:
        node = fh.create_dataset("m", data=source)
        order = np.random.default_rng(1).permutation(len(source))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        layouts._scatter_matrix(node, tmp_path / "m.f32", inverse)
    written = np.fromfile(tmp_path / "m.f32", dtype=np.float32).reshape(source.shape)
    np.testing.assert_array_equal(written, source[order])


def test_by_batch_layout_nests_batch_runs(synth, tmp_path):
    layouts.index_toml(synth["toml"], keys=["X_hvg"], layout_dir=tmp_path / "b", seed=0, pert_col="gene",
                       cell_type_key="cell_type", batch_col="gem_group", by_batch=True)
    lay = layouts.open_layout(synth["data"], tmp_path / "b")
    keys = list(zip(lay.groups["cell_type"].tolist(), lay.groups["pert"].tolist(), lay.groups["batch"].tolist()))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for g, batch in enumerate(lay.groups["batch"].tolist()):
        assert set(lay.batch_codes()[lay.groups["start"][g]:lay.groups["stop"][g]].tolist()) == {batch}


def test_layout_goes_stale_when_the_source_changes(synth):
    cols = {"pert_col": "gene", "cell_type_key": "cell_type", "batch_col": "gem_group"}
    assert layouts.layout_problem(synth["data"], synth["lay"], keys=["X_hvg"], columns=cols) is None
    assert "lacks obsm" in layouts.layout_problem(synth["data"], synth["lay"], keys=["X_emb"], columns=cols)
    with h5py.File(synth["data"], "a") as fh:
        fh["uns"].attrs["touched"] = 1
    assert "stale" in layouts.layout_problem(synth["data"], synth["lay"], keys=["X_hvg"], columns=cols)


def test_index_cli_writes_beside_the_files(tmp_path):
    from state.cli import run as cli_run

    data = make_processed_dataset(tmp_path, n_cells=60, n_genes=20, n_hvgs=8, n_perts=3, seed=0)
    toml = write_toml(tmp_path / "split.toml", dataset_name="d", data_path=data, kind="zeroshot")
    assert cli_run(["tx", "index", "--toml", str(toml)]) == 0
    assert (data.parent / (data.name + ".state_layout") / "meta.json").is_file()


def test_index_cli_on_read_only_data_says_to_pass_a_layout_dir(tmp_path, monkeypatch, capsys):
    """Root ignores permissions, so the refusal a read-only folder gives is raised where the layout is written."""
    from state.cli import run as cli_run
    from state.tx.data import layout

    data = make_processed_dataset(tmp_path, n_cells=60, n_genes=20, n_hvgs=8, n_perts=3, seed=0)
    toml = write_toml(tmp_path / "split.toml", dataset_name="d", data_path=data, kind="zeroshot")
    target = str(data) + ".state_layout"

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", target)

    monkeypatch.setattr(layout, "index_toml", refused)
    assert cli_run(["tx", "index", "--toml", str(toml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and target in err[0] and "--layout-dir" in err[0] and "fast_loader_dir" in err[0]


def test_fast_loader_true_without_layout_is_one_error(tmp_path, synth):
    with pytest.raises(StateError, match="no layout"):
        _data_module(synth["toml"], tmp_path / "elsewhere")


# ------------------------------------------------------------------ split: cell-load's, cell by cell


def _bundled_tomls(tmp_path: Path) -> list[Path]:
    tomls = sorted((ROOT / "examples").glob("*.toml"))
    if FIXTURE_DATA.is_dir():
        fixture = tmp_path / "split_fewshot.toml"
        text = (ROOT / "tests/data/fixtures/tx/state_llama/data/split_fewshot.toml").read_text()
        fixture.write_text(text.replace("/data/state-fixtures/tx/state_llama/data/processed", str(FIXTURE_DATA)))
        tomls.append(fixture)
    return tomls


def _file_rows(dm) -> set[tuple[str, int]]:
    out = set()
    for subset in dm.train_datasets:
        ds = subset.dataset
        rows = np.asarray(ds.all_indices)[np.asarray(subset.indices, dtype=np.int64)]
        out |= {(str(Path(ds.h5_path).resolve()), int(r)) for r in rows}
    return out


def test_split_and_control_pools_equal_cell_loads_on_bundled_tomls(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example TOMLs name their data relative to the repository
    for toml in _bundled_tomls(tmp_path):
        lay = tmp_path / f"lay-{toml.stem}"
        _index(toml, lay)
        dm = _data_module(toml, lay)
        groups, tables, _ = groups_from_data_module(dm, lay)
        ours = set()
        for g, rows in enumerate(groups.rows):
            table = tables[int(groups.file[g])]
            source = str(Path(table.layout.meta["source"]))
            ours |= {(source, int(r)) for r in table.layout.order[rows]}
            pool_rows = set(table.layout.order[groups.pools[int(groups.pool[g])]].tolist())
            ds = next(s.dataset for s in dm.train_datasets if str(Path(s.dataset.h5_path).resolve()) == source)
            first = int(table.layout.order[rows[0]])
            split = ds._find_split_for_idx(first)
            ct = int(ds.metadata_cache.cell_type_codes[first])
            assert pool_rows == {int(i) for i in ds.mapping_strategy.split_control_pool[split][ct]}, toml.name
        assert ours == _file_rows(dm), toml.name


def _epoch_draws(loader) -> tuple[Counter, Counter]:
    cells, groups = Counter(), Counter()
    for batch in loader:
        cells.update(batch["pert_cell_barcode"])
        groups.update(zip(batch["cell_type"], batch["pert_name"]))
    return cells, groups


def test_an_epoch_draws_the_training_cells_as_cell_load_does(synth):
    dm = _data_module(synth["toml"], synth["lay"])
    train = {str(s.dataset.cell_barcodes[i]) for s in dm.train_datasets for i in s.indices}
    fast_cells, fast_groups = _epoch_draws(dm.train_dataloader())
    slow_cells, slow_groups = _epoch_draws(_cell_load_loader(dm))
    assert set(fast_cells) <= train and set(slow_cells) <= train
    assert fast_groups == slow_groups  # every group: ceil(n / set_len) sets, as in cell-load
    # cells of full sets are drawn exactly once (a short set redraws its own cells, as cell-load does)
    assert sum(c == 1 for c in fast_cells.values()) >= 0.8 * len(train)


def test_draw_frequency_matches_cell_loads_expectation():
    """Per cell, the mean draws per epoch equal n_draws(group)/n(group), cell-load's expectation."""
    rng = np.random.default_rng(0)
    sizes = [3, 8, 13, 40]
    starts = np.cumsum([0, *sizes])
    groups = Groups([np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])], np.zeros(4, np.int64),
                    np.zeros(4, np.int64), [np.arange(100, 130)])
    set_len, epochs = 8, 400
    counts = np.zeros(starts[-1])
    for epoch in range(epochs):
        plan = epoch_plan(groups, set_len=set_len, windows=3, batch_size=2, seed=int(rng.integers(1e6)), epoch=epoch)
        for i in range(len(plan.group)):
            rows, ctrl, _ = set_rows(groups, plan, i, set_len, 0, epoch)
            assert len(rows) == len(ctrl) == set_len and set(ctrl.tolist()) <= set(range(100, 130))
            np.add.at(counts, rows, 1)
    for n, a in zip(sizes, starts[:-1]):
        expected = (n // set_len) * set_len + (set_len if n % set_len else 0)  # cell-load's draws per epoch
        assert counts[a:a + n].sum() == expected * epochs
        np.testing.assert_allclose(counts[a:a + n] / epochs, expected / n, rtol=0.15)


# ------------------------------------------------------------------ batches


def test_batch_has_cell_loads_keys_shapes_and_true_rows(synth):
    dm = _data_module(synth["toml"], synth["lay"], store_raw_basal=True)
    fast = dm.transfer_batch_to_device(next(iter(dm.train_dataloader())), torch.device("cpu"), 0)
    slow = next(iter(_cell_load_loader(dm)))
    assert set(fast) == set(slow)
    for key, value in slow.items():
        if torch.is_tensor(value):
            assert fast[key].shape == value.shape and fast[key].dtype == value.dtype, key
        else:
            assert isinstance(fast[key], Sequence) and len(fast[key]) == len(value), key  # str made when read
    with h5py.File(synth["data"], "r") as fh:
        hvg = fh["obsm/X_hvg"][:]
        names = [b.decode() for b in fh["obs/_index"][:]]
        gene = fh["obs/gene/categories"][:].astype(str)[fh["obs/gene/codes"][:]]
        ct = fh["obs/cell_type/categories"][:].astype(str)[fh["obs/cell_type/codes"][:]]
    row_of = {n: i for i, n in enumerate(names)}
    pert = np.array([row_of[b] for b in fast["pert_cell_barcode"]])
    ctrl = np.array([row_of[b] for b in fast["ctrl_cell_barcode"]])
    np.testing.assert_array_equal(fast["pert_cell_emb"].numpy(), hvg[pert])
    np.testing.assert_array_equal(fast["ctrl_cell_counts"].numpy(), hvg[ctrl])
    assert fast["pert_name"] == gene[pert].tolist() and fast["cell_type"] == ct[pert].tolist()
    assert set(gene[ctrl]) == {"non-targeting"} and (ct[ctrl] == ct[pert]).all()
    sets = np.array(fast["pert_name"]).reshape(-1, 8)
    assert (sets == sets[:, :1]).all()  # one perturbation per set
    onehot = dm.pert_onehot_map
    assert all(torch.equal(fast["pert_emb"][i], onehot[n]) for i, n in enumerate(fast["pert_name"]))


def _batches(loader, epoch: int) -> list[dict]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_deterministic_per_seed_and_epoch_and_same_with_workers(synth):
    dm = _data_module(synth["toml"], synth["lay"])
    a0, a1 = _batches(dm.train_dataloader(), 0), _batches(dm.train_dataloader(), 1)
    b0 = _batches(dm.train_dataloader(), 0)
    assert [x["pert_cell_barcode"] for x in a0] == [x["pert_cell_barcode"] for x in b0]
    assert [x["ctrl_cell_barcode"] for x in a0] == [x["ctrl_cell_barcode"] for x in b0]
    assert [x["pert_cell_barcode"] for x in a0] != [x["pert_cell_barcode"] for x in a1]
    dm.num_workers = 2
    w0 = _batches(dm.train_dataloader(), 0)
    assert [x["pert_cell_barcode"] for x in w0] == [x["pert_cell_barcode"] for x in a0]
    assert all(torch.equal(x["pert_cell_emb"], y["pert_cell_emb"]) for x, y in zip(w0, a0))


def test_ranks_draw_disjoint_sets():
    groups = Groups([np.arange(i * 50, i * 50 + 37) for i in range(5)], np.zeros(5, np.int64), np.zeros(5, np.int64),
                    [np.arange(400, 420)])
    plans = [epoch_plan(groups, set_len=8, windows=2, batch_size=2, seed=1, epoch=2, rank=r, world_size=2)
             for r in range(2)]
    assert len(plans[0].group) == len(plans[1].group) > 0
    assert not set(plans[0].set_ids.tolist()) & set(plans[1].set_ids.tolist())
    full = [{int(r) for i in range(len(p.group)) if p.lengths[i].sum() == 8
             for r in set_rows(groups, p, i, 8, 1, 2)[0]} for p in plans]
    assert not full[0] & full[1]


def test_part_sizes_sum_to_the_set_length():
    assert part_sizes(10, 4).tolist() == [3, 3, 2, 2]
    assert part_sizes(3, 8).tolist() == [1, 1, 1]



def test_vocabulary_rows_equal_the_map_for_wide_one_hot_and_dense_maps():
    from state.tx.data.split_tables import Vocabulary

    names = [f"p{i}" for i in range(100)]
    one_hot = {n: torch.eye(100)[i] for i, n in enumerate(names)}
    dense = {n: torch.randn(7) for n in names}
    for mapping in (one_hot, dense):
        vocab = Vocabulary.from_map(mapping)
        assert (vocab.hot is not None) == (mapping is one_hot)
        index = vocab.index_of(["p5", "p99", "unknown", "p5"])
        rows = vocab.rows(index)
        assert torch.equal(rows[0], mapping["p5"]) and torch.equal(rows[1], mapping["p99"])
        assert torch.equal(rows[3], mapping["p5"]) and not rows[2].any()  # unknown name: zeros
        assert vocab.names[index].tolist() == ["p5", "p99", "", "p5"]


def test_dataset_of_several_files_mixes_them_in_a_batch_like_cell_load(tmp_path):
    folder = tmp_path / "data"
    for i in range(2):
        make_processed_dataset(folder, filename=f"part{i}.h5ad", n_cells=160, n_genes=20, n_hvgs=20, n_perts=4,
                               seed=i)
    toml = write_toml(tmp_path / "split.toml", dataset_name="d", data_path=folder, kind="zeroshot")
    _index(toml, tmp_path / "lay")
    dm = _data_module(toml, tmp_path / "lay", batch_size=4)
    fast_cells, fast_groups = _epoch_draws(dm.train_dataloader())
    slow_cells, slow_groups = _epoch_draws(_cell_load_loader(dm))
    assert fast_groups == slow_groups
    first = next(iter(dm.train_dataloader()))
    assert torch.equal(first["pert_emb"].sum(1), torch.ones(len(first["pert_name"])))


@pytest.mark.parametrize("done", ["mid", "end"])
def test_resume_state_continues_the_epoch_or_starts_the_next_whole(synth, done):
    """Lightning loads the state, then sets the epoch it resumes in: after the epoch's last batch that is the
    next epoch, which must come whole (not skip as many batches as the epoch before had)."""
    dm = _data_module(synth["toml"], synth["lay"])
    first, second = _batches(dm.train_dataloader(), 0), _batches(dm.train_dataloader(), 1)
    n_done = 2 if done == "mid" else len(first)
    saved = dm.train_dataloader()
    saved.progress = lambda: n_done
    state = saved.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(0 if done == "mid" else 1)  # what Lightning does next
    expected = first[n_done:] if done == "mid" else second
    assert [x["pert_cell_barcode"] for x in resumed] == [x["pert_cell_barcode"] for x in expected]
