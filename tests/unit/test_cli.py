"""The command-line surface: every arc-state 0.11.1 flag (and July-2025 spelling) parses with its default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from state.cli import build_parser, run

# Minimal valid command lines (required flags only) for every leaf command.
REQUIRED = {
    ("tx", "predict"): ["--output-dir", "runs/r"],
    ("tx", "infer"): ["--adata", "in.h5ad", "--model-dir", "runs/r"],
    ("tx", "preprocess_train"): ["--adata", "in.h5ad", "--output", "out.h5ad", "--num_hvgs", "2000"],
    ("tx", "preprocess_infer"): ["--adata", "in.h5ad", "--output", "out.h5ad", "--control_condition", "DMSO",
                                 "--pert_col", "drug"],
    ("emb", "fit"): [],
    ("emb", "transform"): ["--input", "in.h5ad"],
    ("emb", "query"): ["--lancedb", "db", "--input", "q.h5ad", "--output", "hits.csv"],
    ("emb", "preprocess"): ["--profile-name", "p", "--train-csv", "t.csv", "--val-csv", "v.csv",
                            "--output-dir", "out"],
    ("emb", "eval"): ["--checkpoint", "m.ckpt", "--adata", "in.h5ad"],
}  # fmt: skip

# Defaults of arc-state 0.11.1 (spec tx §1.3-1.6, emb §1.1-1.6), by argparse dest.
DEFAULTS = {
    ("tx", "predict"): dict(output_dir="runs/r", toml=None, checkpoint="last.ckpt", test_time_finetune=0,
                            profile="full", predict_only=False, skip_adatas=False, shared_only=False,
                            eval_train_data=False, pseudobulk=False, stream_adatas=False, scorer="cell-eval",
                            preset="vcc2026"),
    ("tx", "infer"): dict(checkpoint=None, adata="in.h5ad", embed_key=None, pert_col="drugname_drugconc",
                          output=None, model_dir="runs/r", celltype_col=None, celltypes=None, batch_col=None,
                          control_pert=None, seed=42, max_set_len=None, quiet=False, tsv=None, all_perts=False,
                          virtual_cells_per_pert=None, min_cells=None, max_cells=None, output_counts=None),
    ("tx", "preprocess_train"): dict(adata="in.h5ad", output="out.h5ad", num_hvgs=2000),
    ("tx", "preprocess_infer"): dict(adata="in.h5ad", output="out.h5ad", control_condition="DMSO",
                                     pert_col="drug", seed=42),
    ("emb", "fit"): dict(conf=None, hydra_overrides=[]),
    ("emb", "transform"): dict(model_folder=None, checkpoint=None, config=None, input=["in.h5ad"], output=None,
                               embed_key="X_state", protein_embeddings=None, lancedb=None, lancedb_update=False,
                               lancedb_batch_size=1000, batch_size=None),
    ("emb", "query"): dict(lancedb="db", input="q.h5ad", output="hits.csv", k=3, embed_key="X_state",
                           exclude_distances=False, filter=None, batch_size=100),
    ("emb", "preprocess"): dict(profile_name="p", train_csv="t.csv", val_csv="v.csv", output_dir="out",
                                config_file="src/state/configs/state-defaults.yaml", all_embeddings=None,
                                num_threads=1),
    ("emb", "eval"): dict(checkpoint="m.ckpt", adata="in.h5ad", config=None, pert_col="gene",
                          control_pert="non-targeting", gene_column="gene_name", batch_size=None,
                          protein_embeddings=None),
}  # fmt: skip

# Every optional flag with a non-default value: (command, argv, dest, parsed value).
SET_FLAGS = [
    (("tx", "predict"), ["--toml", "x.toml"], "toml", "x.toml"),
    (("tx", "predict"), ["--checkpoint", "best.ckpt"], "checkpoint", "best.ckpt"),
    (("tx", "predict"), ["--test-time-finetune", "3"], "test_time_finetune", 3),
    (("tx", "predict"), ["--profile", "minimal"], "profile", "minimal"),
    (("tx", "predict"), ["--predict-only"], "predict_only", True),
    (("tx", "predict"), ["--scorer", "cell-eval2"], "scorer", "cell-eval2"),
    (("tx", "predict"), ["--preset", "v2"], "preset", "v2"),
    (("tx", "predict"), ["--skip-adatas"], "skip_adatas", True),
    (("tx", "predict"), ["--shared-only"], "shared_only", True),
    (("tx", "predict"), ["--eval-train-data"], "eval_train_data", True),
    (("tx", "predict"), ["--pseudobulk"], "pseudobulk", True),
    (("tx", "predict"), ["--stream-adatas"], "stream_adatas", True),
    (("tx", "infer"), ["--checkpoint", "c.ckpt"], "checkpoint", "c.ckpt"),
    (("tx", "infer"), ["--embed-key", "X_hvg"], "embed_key", "X_hvg"),
    (("tx", "infer"), ["--pert-col", "gene"], "pert_col", "gene"),
    (("tx", "infer"), ["--output", "o.npy"], "output", "o.npy"),
    (("tx", "infer"), ["--celltype-col", "ct"], "celltype_col", "ct"),
    (("tx", "infer"), ["--celltypes", "a,b"], "celltypes", "a,b"),
    (("tx", "infer"), ["--batch-col", "gem"], "batch_col", "gem"),
    (("tx", "infer"), ["--control-pert", "ctrl"], "control_pert", "ctrl"),
    (("tx", "infer"), ["--seed", "7"], "seed", 7),
    (("tx", "infer"), ["--output-counts"], "output_counts", "stochastic"),
    (("tx", "infer"), ["--counts", "multinomial"], "output_counts", "multinomial"),
    (("tx", "infer"), ["--max-set-len", "64"], "max_set_len", 64),
    (("tx", "infer"), ["--quiet"], "quiet", True),
    (("tx", "infer"), ["--tsv", "p.tsv"], "tsv", "p.tsv"),
    (("tx", "infer"), ["--all-perts"], "all_perts", True),
    (("tx", "infer"), ["--virtual-cells-per-pert", "5"], "virtual_cells_per_pert", 5),
    (("tx", "infer"), ["--min-cells", "2"], "min_cells", 2),
    (("tx", "infer"), ["--max-cells", "9"], "max_cells", 9),
    (("tx", "preprocess_infer"), ["--seed", "1"], "seed", 1),
    (("emb", "fit"), ["--conf", "c.yaml", "a.b=1", "+c=2"], "hydra_overrides", ["a.b=1", "+c=2"]),
    (("emb", "fit"), ["--conf", "c.yaml"], "conf", "c.yaml"),
    (("emb", "transform"), ["--model-folder", "m"], "model_folder", "m"),
    (("emb", "transform"), ["--checkpoint", "c.ckpt"], "checkpoint", "c.ckpt"),
    (("emb", "transform"), ["--config", "c.yaml"], "config", "c.yaml"),
    (("emb", "transform"), ["--output", "o.h5ad"], "output", "o.h5ad"),
    (("emb", "transform"), ["--embed-key", "X_se"], "embed_key", "X_se"),
    (("emb", "transform"), ["--protein-embeddings", "p.pt"], "protein_embeddings", "p.pt"),
    (("emb", "transform"), ["--lancedb", "db"], "lancedb", "db"),
    (("emb", "transform"), ["--lancedb-update"], "lancedb_update", True),
    (("emb", "transform"), ["--lancedb-batch-size", "10"], "lancedb_batch_size", 10),
    (("emb", "transform"), ["--batch-size", "4"], "batch_size", 4),
    (("emb", "query"), ["--k", "5"], "k", 5),
    (("emb", "query"), ["--embed-key", "X_se"], "embed_key", "X_se"),
    (("emb", "query"), ["--exclude-distances"], "exclude_distances", True),
    (("emb", "query"), ["--filter", "cell_type=='B'"], "filter", "cell_type=='B'"),
    (("emb", "query"), ["--batch-size", "7"], "batch_size", 7),
    (("emb", "preprocess"), ["--config-file", "c.yaml"], "config_file", "c.yaml"),
    (("emb", "preprocess"), ["--all-embeddings", "g.pt"], "all_embeddings", "g.pt"),
    (("emb", "preprocess"), ["--num-threads", "4"], "num_threads", 4),
    (("emb", "eval"), ["--config", "c.yaml"], "config", "c.yaml"),
    (("emb", "eval"), ["--pert-col", "drug"], "pert_col", "drug"),
    (("emb", "eval"), ["--control-pert", "DMSO"], "control_pert", "DMSO"),
    (("emb", "eval"), ["--gene-column", "sym"], "gene_column", "sym"),
    (("emb", "eval"), ["--batch-size", "8"], "batch_size", 8),
    (("emb", "eval"), ["--protein-embeddings", "p.pt"], "protein_embeddings", "p.pt"),
]  # fmt: skip

# July-2025 spellings that old scripts use: (command, argv without the command's required flags, dest, value).
JULY_ALIASES = [
    (("tx", "predict"), ["--output_dir", "old/run"], "output_dir", "old/run"),
    (("tx", "predict"), ["--predict_only"], "predict_only", True),
    (("tx", "predict"), ["--test_time_finetune", "2"], "test_time_finetune", 2),
    (("tx", "infer"), ["--model_dir", "old/run"], "model_dir", "old/run"),
    (("tx", "infer"), ["--embed_key", "X_hvg"], "embed_key", "X_hvg"),
    (("tx", "infer"), ["--pert_col", "gene"], "pert_col", "gene"),
    (("tx", "infer"), ["--celltype_col", "ct"], "celltype_col", "ct"),
    (("tx", "infer"), ["--batch_size", "16"], "batch_size", 16),
    (("emb", "transform"), ["--gene-column", "gene_symbols"], "gene_column", "gene_symbols"),
]  # fmt: skip


def _parse(command: tuple[str, str], extra: list[str]):
    return build_parser().parse_args([*command, *REQUIRED[command], *extra])


@pytest.mark.parametrize("command", sorted(DEFAULTS), ids="-".join)
def test_defaults_match_arc_state(command):
    args = _parse(command, [])
    for dest, expected in DEFAULTS[command].items():
        assert getattr(args, dest) == expected, dest
    assert args.handler.startswith(f"state.cli.{command[0]}_handlers:")


@pytest.mark.parametrize(("command", "argv", "dest", "value"), SET_FLAGS + JULY_ALIASES)
def test_every_flag_parses(command, argv, dest, value):
    assert getattr(_parse(command, argv), dest) == value


@pytest.mark.parametrize("command", sorted(c for c, flags in REQUIRED.items() if flags), ids="-".join)
def test_missing_required_flag_is_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(list(command))
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_top_level_help_lists_both_model_families(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["-h"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "tx" in out and "emb" in out


@pytest.mark.parametrize(
    "argv",
    [["tx", "--help"], ["emb", "--help"], *[[*command, "--help"] for command in sorted(REQUIRED)]],
    ids=" ".join,
)
def test_every_subcommand_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 0
    assert "usage: state " + " ".join(argv[:-1]) in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_tx_train_help_prints_the_composed_config(flag, capsys):
    assert run(["tx", "train", flag, "model.kwargs.nope=1"]) == 0  # overrides are ignored with --help
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[:3] == ["Hydra Configuration Help", lines[1], "Configuration for method: tx"]
    assert set(lines[1]) == {"="}
    assert "name: PerturbationDataModule" in out and "transformer_backbone_key: llama" in out
    assert "Available config groups:" in out and "state_sm" in out and "scvi" in out


def test_tx_train_without_toml_names_the_override(capsys):
    assert run(["tx", "train", "training.max_steps=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "data.kwargs.toml_config_path=path/to/split.toml" in err


def test_tx_train_unknown_group_choice_lists_choices(capsys):
    assert run(["tx", "train", "model=stat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model choice 'stat'" in err and "state_sm" in err and "\n" not in err


def test_cli_entry_point_in_a_subprocess():
    """The real console path: -h works, a bad override exits 2 with one stderr line and no traceback."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "state", "-h"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "{emb,tx}" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "state", "tx", "train", "model.kwargs.hiden_dim=3"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'model.kwargs.hiden_dim'")
    assert "+model.kwargs.hiden_dim=3" in lines[0]
