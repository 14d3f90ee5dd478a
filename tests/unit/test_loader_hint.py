"""The "no layout" hint of `tx train`: printed only where the layout would gain something."""

from __future__ import annotations

import logging
import os

import pytest

from helpers.synthetic import make_processed_dataset, write_toml
from state.tx.data import layout as layouts
from state.tx.data.selection import decide

KW = {"embed_key": "X_hvg", "output_space": "gene", "pert_col": "gene", "cell_type_key": "cell_type",
      "batch_col": "gem_group", "control_pert": "non-targeting", "fast_loader": "auto"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("hint")
    data = make_processed_dataset(root, n_cells=200, n_genes=30, n_hvgs=12, n_perts=3, seed=0)  # X_hvg: 9.6 KB
    return write_toml(root / "split.toml", dataset_name="d", data_path=data, kind="fewshot"), data


def _hints(small, caplog, **extra) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="state"):
        assert not decide({**KW, "toml_config_path": str(small[0]), **extra}).use
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "state tx index" in r.getMessage()]


def test_no_hint_when_the_obsm_cache_serves_every_file(small, caplog, monkeypatch):
    monkeypatch.delenv("STATE_OBSM_CACHE_MB", raising=False)
    assert _hints(small, caplog) == []
    assert any("fit the in-memory cache" in r.getMessage() for r in caplog.records)  # said at debug level


@pytest.mark.parametrize("budget_mb, why", [("0.005", "X_hvg'] of"), ("0", "cache is off")])
def test_hint_when_files_are_past_the_cache(small, caplog, monkeypatch, budget_mb, why):
    monkeypatch.setenv("STATE_OBSM_CACHE_MB", budget_mb)  # 0.005 MiB = 5 KB < the 9.6 KB matrix
    hints = _hints(small, caplog)
    assert len(hints) == 1 and why in hints[0] and "training loader: cell-load (no layout" in hints[0]


def test_stale_layout_is_always_reported(small, caplog, monkeypatch, tmp_path):
    monkeypatch.delenv("STATE_OBSM_CACHE_MB", raising=False)
    toml, data = small
    layouts.index_toml(toml, keys=["X_hvg"], pert_col="gene", cell_type_key="cell_type", batch_col="gem_group",
                       layout_dir=tmp_path)  # a folder of its own: the other tests see no layout
    assert decide({**KW, "toml_config_path": str(toml), "fast_loader_dir": str(tmp_path)}).use
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the source "changed"
    try:
        hints = _hints(small, caplog, fast_loader_dir=str(tmp_path))
    finally:
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(hints) == 1 and "is stale" in hints[0]


def test_full_gene_defaults_without_layout_warn_on_a_gpu_machine_with_the_x_command(small, caplog, monkeypatch):
    """embed_key=null, output_space=all: X is never cached, so the layout always gains; a GPU would wait."""
    import torch

    monkeypatch.delenv("STATE_OBSM_CACHE_MB", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hints = _hints(small, caplog, embed_key=None, output_space="all")
    assert len(hints) == 1 and "--keys X " in hints[0] and "reads X" in hints[0]
    assert [r.levelno for r in caplog.records if "state tx index" in r.getMessage()] == [logging.WARNING]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _hints(small, caplog, embed_key=None, output_space="all")
    assert [r.levelno for r in caplog.records if "state tx index" in r.getMessage()] == [logging.INFO]
