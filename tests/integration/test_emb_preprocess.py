"""`state emb preprocess`: profile files, CSVs and config blocks (spec §1.5, §7.1)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
import yaml

from state.cli import run
from state.emb.data.synthetic import make_se_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_se_corpus(tmp_path_factory.mktemp("pp_corpus"), n_vocab=60, genes_per_dataset=40,
                          train_cells=(10, 8), val_cells=(6,), seed=5)


def _run(corpus, tmp_path, *extra: str) -> int:
    return run(["emb", "preprocess", "--profile-name", "toy", "--train-csv", str(corpus.train_csv),
                "--val-csv", str(corpus.val_csv), "--output-dir", str(tmp_path / "out"),
                "--config-file", str(tmp_path / "cfg.yaml"), *extra])


def test_preprocess_with_embeddings_writes_profile_and_config(corpus, tmp_path):
    (tmp_path / "cfg.yaml").write_text("model:\n  batch_size: 4\n")
    lower = {k.lower(): v for k, v in torch.load(corpus.gene_embeddings).items()}  # names are upper-cased
    torch.save(lower, tmp_path / "lower.pt")
    assert _run(corpus, tmp_path, "--all-embeddings", str(tmp_path / "lower.pt")) == 0
    out = tmp_path / "out"
    vectors = torch.load(out / "all_embeddings_toy.pt")
    mapping = torch.load(out / "ds_emb_mapping_toy.torch")
    masks = torch.load(out / "valid_genes_masks_toy.torch")
    assert list(vectors) == [k.upper() for k in lower] and vectors["GENE0000"].shape == (16,)
    assert set(mapping) == {"train_0", "train_1", "val_0"}
    for name, m in mapping.items():
        assert m.dtype == torch.long and m.shape == (44,)
        assert int((m == -1).sum()) == 4  # the UNKNOWN genes
        assert torch.equal(masks[name], m != -1)
    train = pd.read_csv(out / "train_toy.csv")
    assert list(train.columns) == ["species", "path", "names", "num_cells", "num_genes", "groupid_for_de"]
    assert train["num_cells"].tolist() == [10, 8] and set(train["groupid_for_de"]) == {"leiden"}
    cfg = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    assert cfg["model"] == {"batch_size": 4}  # existing content is kept
    assert cfg["embeddings"]["toy"] == {
        "all_embeddings": str(out / "all_embeddings_toy.pt"),
        "ds_emb_mapping": str(out / "ds_emb_mapping_toy.torch"),
        "valid_genes_masks": str(out / "valid_genes_masks_toy.torch"),
        "size": 16,
        "num": 60,
    }
    assert cfg["dataset"]["toy"]["num_datasets"] == 3 and cfg["dataset"]["toy"]["ds_type"] == "h5ad"
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_preprocess_without_embeddings_builds_one_hot_vocabulary(corpus, tmp_path):
    assert _run(corpus, tmp_path) == 0
    vectors = torch.load(tmp_path / "out" / "all_embeddings_toy.pt")
    assert list(vectors) == sorted(vectors)
    assert torch.equal(torch.stack(list(vectors.values())), torch.eye(len(vectors)))
    mapping = torch.load(tmp_path / "out" / "ds_emb_mapping_toy.torch")
    assert all((m >= 0).all() for m in mapping.values())  # every gene is in the union
    cfg = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    assert cfg["embeddings"]["toy"]["size"] == cfg["embeddings"]["toy"]["num"] == len(vectors)


def test_preprocess_skips_unreadable_files(corpus, tmp_path, state_log):
    broken = tmp_path / "broken.h5ad"
    broken.write_text("not hdf5")
    train = pd.read_csv(corpus.train_csv)
    train.loc[len(train)] = ["human", str(broken), "broken"]
    train.to_csv(tmp_path / "train.csv", index=False)
    shutil.copy(corpus.val_csv, tmp_path / "val.csv")
    code = run(["emb", "preprocess", "--profile-name", "toy", "--train-csv", str(tmp_path / "train.csv"),
                "--val-csv", str(tmp_path / "val.csv"), "--output-dir", str(tmp_path / "out"),
                "--config-file", str(tmp_path / "cfg.yaml"), "--num-threads", "2"])
    assert code == 0
    assert "SKIPPED: name=broken" in state_log.text
    assert pd.read_csv(tmp_path / "out" / "train_toy.csv")["names"].tolist() == ["train_0", "train_1"]
    cfg = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    assert cfg["dataset"]["toy"]["num_datasets"] == 4  # input rows, as arc-state counts them


def test_preprocess_bad_csv_is_a_one_line_error(corpus, tmp_path, capsys):
    pd.DataFrame({"path": ["x"], "names": ["y"]}).to_csv(tmp_path / "bad.csv", index=False)
    code = run(["emb", "preprocess", "--profile-name", "toy", "--train-csv", str(tmp_path / "bad.csv"),
                "--val-csv", str(corpus.val_csv), "--output-dir", str(tmp_path / "out"),
                "--config-file", str(tmp_path / "cfg.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [err[-1]] and "lacks column(s) species" in err[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cfg.yaml").exists()
