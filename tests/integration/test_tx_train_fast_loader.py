"""`state tx train` on the fast set loader: same run directory as cell-load's path, mid-epoch resume."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from helpers.synthetic import make_processed_dataset, write_toml
from state.io.safe_load import safe_torch_load
from state.tx.config.compose import compose_tx_config
from state.tx.data import layout as layouts
from state.tx.data.loader import LayoutSetDataset
from state.tx.data.module import build_data_module, setup_data_module
from state.tx.train.run import train

TINY = ["model=state", "model.kwargs.cell_set_len=8", "model.kwargs.hidden_dim=16",
        "model.kwargs.transformer_backbone_kwargs.intermediate_size=32",
        "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=1",
        "model.kwargs.transformer_backbone_kwargs.num_attention_heads=2",
        "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=2",
        "model.kwargs.transformer_backbone_kwargs.head_dim=8"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    data = make_processed_dataset(root / "data", n_cells=400, n_genes=30, n_hvgs=12, n_perts=4, seed=0)
    toml = write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")
    return {"data": data, "toml": toml}


def _args(synth, out, name: str, mode: str, steps: int) -> list[str]:
    data = {"toml_config_path": synth["toml"], "embed_key": "X_hvg", "output_space": "gene", "num_workers": 0,
            "control_pert": "non-targeting", "fast_loader": mode}
    return [*(f"data.kwargs.{k}={v}" for k, v in data.items()), "use_wandb=false", f"output_dir={out}",
            f"name={name}", f"training.max_steps={steps}", "training.val_freq=3", "training.batch_size=2", *TINY]


def test_auto_without_layout_trains_on_cell_load_and_says_how_to_index(synth, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("STATE_OBSM_CACHE_MB", "0.001")  # the file is past the cache: the layout would gain
    with caplog.at_level(logging.INFO):
        train(compose_tx_config(_args(synth, tmp_path, "slow", "auto", 2)))
    hints = [r.getMessage() for r in caplog.records if "state tx index --toml" in r.getMessage()]
    assert len(hints) == 1 and "training loader: cell-load" in hints[0] and "past the in-memory" in hints[0]


def test_fast_path_trains_writes_arc_files_and_resumes_mid_epoch(synth, tmp_path, monkeypatch):
    layouts.index_toml(synth["toml"], keys=["X_hvg"], pert_col="gene", cell_type_key="cell_type",
                       batch_col="gem_group")
    served: list[tuple[int, int]] = []
    original = LayoutSetDataset.__getitem__

    def record(self, index):
        if self.spec.shuffle:  # training batches (validation reads the layout too)
            served.append(tuple(index))
        return original(self, index)

    monkeypatch.setattr(LayoutSetDataset, "__getitem__", record)
    first = train(compose_tx_config(_args(synth, tmp_path, "fast", "true", 3)))
    assert first.global_step == 3 and served[:3] == [(0, 0), (0, 1), (0, 2)]
    run = first.run_dir
    state = safe_torch_load(run / "data_module.torch")
    assert not [k for k in state if "fast" in k or "layout" in k]  # arc-state reads this file
    ckpt = safe_torch_load(run / "checkpoints" / "last.ckpt")
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches_done": 3}]

    served.clear()
    resumed = train(compose_tx_config(_args(synth, tmp_path, "fast", "true", 5)))
    assert resumed.resumed_from is not None and resumed.global_step == 5
    assert served[:2] == [(0, 3), (0, 4)]  # the same epoch goes on where the checkpoint left it


def _rank_draws(rank: int, world: int, toml: str, lay: str, port: int, out: str) -> None:
    import json
    import os

    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        kw = {"toml_config_path": toml, "embed_key": "X_hvg", "output_space": "gene", "num_workers": 0,
              "control_pert": "non-targeting", "barcode": True, "fast_loader": "true", "fast_loader_dir": lay}
        dm = build_data_module("PerturbationDataModule", kw, batch_size=3, cell_sentence_len=8)
        setup_data_module(dm)
        sets = [b["pert_cell_barcode"][i:i + 8] for b in dm.train_dataloader() for i in range(0, len(b["pert_name"]), 8)]
        Path(out, f"rank{rank}.json").write_text(json.dumps(sets))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_on_gloo_get_disjoint_sets(synth, tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    layouts.index_toml(synth["toml"], keys=["X_hvg"], pert_col="gene", cell_type_key="cell_type",
                       batch_col="gem_group", layout_dir=tmp_path / "lay")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_draws, args=(2, str(synth["toml"]), str(tmp_path / "lay"), port, str(tmp_path)), nprocs=2)
    sets = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(sets[0]) == len(sets[1]) > 0
    full = [{c for s in rank_sets if len(set(s)) == 8 for c in s} for rank_sets in sets]
    assert full[0] and full[1] and not full[0] & full[1]


def test_shipped_defaults_train_from_the_x_layout_and_a_truncated_one_stops_before_the_run(synth, tmp_path,
                                                                                             monkeypatch):
    """embed_key=null and output_space=all (configs/data/perturbation.yaml) read X from the layout."""
    from state.utils.errors import StateError

    lay = tmp_path / "lay"
    folder = layouts.index_toml(synth["toml"], keys=["X"], pert_col="gene", cell_type_key="cell_type",
                                batch_col="gem_group", layout_dir=lay)[0]
    served: list = []
    original = LayoutSetDataset.__getitem__
    monkeypatch.setattr(LayoutSetDataset, "__getitem__",
                        lambda self, i: served.append((self.spec.shuffle, i)) or original(self, i))

    def args(name: str) -> list[str]:
        base = _args(synth, tmp_path, name, "true", 2)
        base = [a for a in base if not a.startswith(("data.kwargs.embed_key", "data.kwargs.output_space"))]
        return [*base, f"data.kwargs.fast_loader_dir={lay}"]

    result = train(compose_tx_config(args("defaults")))
    assert result.global_step == 2 and sum(train for train, _ in served) >= 2
    assert any(not train for train, _ in served)  # Lightning's sanity validation read the layout too
    with (folder / "X.indices.i32").open("r+b") as fh:
        fh.truncate(8)
    with pytest.raises(StateError, match="X.indices.i32 is truncated"):
        train(compose_tx_config(args("cut")))
    assert not (tmp_path / "cut").exists()  # nothing created
