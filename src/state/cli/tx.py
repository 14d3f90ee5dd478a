"""``state tx ...``: flags of arc-state 0.11.1 plus the July-2025 spellings as aliases."""

from __future__ import annotations

import argparse


def _bool_flag(parser: argparse.ArgumentParser, *names: str, help: str) -> None:
    parser.add_argument(*names, action="store_true", default=False, help=help)


def add_parser(commands) -> None:
    tx = commands.add_parser("tx", help="State Transition model: train, predict, infer, preprocess")
    sub = tx.add_subparsers(dest="subcommand", required=True, metavar="{train,predict,infer,preprocess_train,preprocess_infer,stats,index}")
    _add_train(sub)
    _add_predict(sub)
    _add_infer(sub)
    _add_preprocess_train(sub)
    _add_preprocess_infer(sub)
    _add_stats(sub)
    _add_index(sub)


def _add_train(sub) -> None:
    # arc-state disables argparse help here: `--help` prints the composed Hydra config instead.
    p = sub.add_parser(
        "train",
        add_help=False,
        help="train a model: state tx train key=value ... (Hydra overrides)",
        description="Train with Hydra overrides, e.g. `state tx train data.kwargs.toml_config_path=x.toml`.",
    )
    p.add_argument("hydra_overrides", nargs="*", help="Hydra overrides: key=value, +key=value, ~key, group=choice")
    p.add_argument("-h", "--help", action="store_true", help="print the composed default config and config groups")
    p.set_defaults(handler="state.cli.tx_handlers:train")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="evaluate a trained run on its test split (cell-eval metrics)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                   help="run directory that holds config.yaml; results go under it")
    p.add_argument("--toml", default=None, help="alternate TOML data config to evaluate on")
    p.add_argument("--checkpoint", default="last.ckpt",
                   help="checkpoint: final, best, last (.ckpt optional), another file name in <run>/checkpoints/ "
                   "or a path to a .ckpt")
    p.add_argument("--test-time-finetune", "--test_time_finetune", dest="test_time_finetune", type=int, default=0,
                   help="epochs of fine-tuning on control-only batches before predicting")
    p.add_argument("--profile", default="full", choices=["full", "minimal", "de", "anndata", "vcc"],
                   help="cell-eval metric profile")
    # Not in arc-state: the 2026 challenge scores with cell-eval2 (extra: pip install 'state[eval2]').
    p.add_argument("--scorer", default="cell-eval", choices=["cell-eval", "cell-eval2", "both"],
                   help="scoring package: cell-eval (2025 challenge), cell-eval2 (2026 challenge; tables in "
                   "<eval dir>/cell_eval2/, scaled scores in cell_eval2_scores.csv) or both")
    p.add_argument("--preset", default="vcc2026", help="cell-eval2 preset (vcc2026 is the 2026 challenge's)")
    _bool_flag(p, "--predict-only", "--predict_only", help="skip cell-eval metrics")
    _bool_flag(p, "--skip-adatas", "--skip_adatas", help="do not write adata_pred.h5ad / adata_real.h5ad")
    _bool_flag(p, "--shared-only", "--shared_only", help="keep only perturbations present in train and test")
    _bool_flag(p, "--eval-train-data", "--eval_train_data", help="predict on the training split instead of test")
    _bool_flag(p, "--pseudobulk", help="average predictions per (context, perturbation) before evaluation")
    _bool_flag(p, "--stream-adatas", "--stream_adatas",
               help="stream per-batch predictions to adata_pred/adata_real.h5ad, bounding memory; "
               "requires --predict-only")
    _bool_flag(p, "--baselines", help="also fit perturb_mean and linear on the run's training split and show "
               "them beside the model (table + baselines_comparison.png)")
    p.add_argument("--eval-dir", "--eval_dir", default=None,
                   help="folder for the results instead of <run>/eval_<checkpoint>/ (a run shared read-only)")
    p.set_defaults(handler="state.cli.tx_handlers:predict")


def _add_infer(sub) -> None:
    p = sub.add_parser("infer", help="simulate perturbations on the cells of an h5ad")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint: final, best, last (.ckpt optional), a file name in <model-dir>/checkpoints/ "
                   "or a path to a .ckpt (default <model-dir>/checkpoints/final.ckpt)")
    p.add_argument("--adata", required=True, help="input h5ad")
    p.add_argument("--embed-key", "--embed_key", dest="embed_key", default=None,
                   help="obsm key of the input features (default: .X)")
    p.add_argument("--pert-col", "--pert_col", dest="pert_col", default="drugname_drugconc",
                   help="obs column with perturbation labels")
    p.add_argument("--output", default=None, help=".h5ad (default <input>_simulated.h5ad) or .npy")
    p.add_argument("--model-dir", "--model_dir", dest="model_dir", required=True, help="run directory")
    p.add_argument("--celltype-col", "--celltype_col", dest="celltype_col", default=None,
                   help="obs column with cell types (default: auto-detect)")
    p.add_argument("--celltypes", default=None, help="comma-separated cell types to keep")
    p.add_argument("--batch-col", "--batch_col", dest="batch_col", default=None,
                   help="obs batch column (only for models with a batch encoder)")
    p.add_argument("--control-pert", "--control_pert", dest="control_pert", default=None, help="control label")
    p.add_argument("--seed", type=int, default=42, help="RNG seed for control sampling")
    p.add_argument("--max-set-len", "--max_set_len", dest="max_set_len", type=int, default=None,
                   help="max cells per forward pass (default: the model's cell_set_len)")
    _bool_flag(p, "--quiet", help="less printing")
    p.add_argument("--tsv", default=None, help="TSV with columns perturbation,num_cells to simulate")
    _bool_flag(p, "--all-perts", "--all_perts", help="simulate every perturbation the model knows")
    p.add_argument("--virtual-cells-per-pert", "--virtual_cells_per_pert", dest="virtual_cells_per_pert",
                   type=int, default=None, help="with --all-perts, cells per virtual perturbation")
    p.add_argument("--min-cells", "--min_cells", dest="min_cells", type=int, default=None,
                   help="pad each perturbation to at least N cells")
    p.add_argument("--max-cells", "--max_cells", dest="max_cells", type=int, default=None,
                   help="subsample perturbations above N cells")
    _bool_flag(p, "--unknown-as-control", "--unknown_as_control",
               help="simulate perturbations the model does not know with the control vector "
               "(arc-state's silent behaviour) instead of stopping")
    _bool_flag(p, "--verbose", help="with --embed-key X_hvg: say whether the input names its HVG columns "
               "(uns['X_hvg_var_names'])")
    _bool_flag(p, "--global-control-fallback", "--global_control_fallback",
               help="let cell types without control cells draw basal cells from all control cells "
               "(arc-state's silent behaviour) instead of stopping")
    # Not in arc-state: VCC 2026 / cell-eval2 score raw integer counts.
    p.add_argument("--output-counts", "--counts", dest="output_counts", nargs="?", const="stochastic",
                   default=None, choices=["stochastic", "multinomial"],
                   help="write integer counts to X instead of log1p values: expm1 of the prediction scaled to "
                   "library sizes drawn from the input's control cells, rounded by the given rule "
                   "(default stochastic), reproducible with --seed; recorded in uns['state_counts']")
    p.add_argument("--full-genes", "--full_genes", dest="full_genes", nargs="?", const=True, default=False,
                   metavar="GENE_LIST",
                   help="write every gene, not only the model's (e.g. its HVGs): modelled genes from the prediction, "
                   "the others from the control cell each simulated cell started from (input X, log1p), in the order "
                   "of the input's var or of GENE_LIST (one name per line; listed genes missing from the input are "
                   "refused); --output-counts then applies to every gene")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help=argparse.SUPPRESS)  # July-2025 flag, accepted and unused
    p.set_defaults(handler="state.cli.tx_handlers:infer")


def _add_preprocess_train(sub) -> None:
    p = sub.add_parser("preprocess_train", help="normalize, log1p and select HVGs for training")
    p.add_argument("--adata", required=True, help="input h5ad with raw counts")
    p.add_argument("--output", required=True, help="output h5ad")
    p.add_argument("--num_hvgs", "--num-hvgs", dest="num_hvgs", type=int, required=True,
                   help="number of highly variable genes (written to obsm['X_hvg'])")
    _bool_flag(p, "--input-is-log1p", "--input_is_log1p",
               help="X is already normalized and log1p-transformed: only select HVGs")
    # Not in arc-state: the fast training layout of the output, in the same run (see `state tx index`).
    _bool_flag(p, "--write-layout", "--write_layout",
               help="also write the output's fast training layout (<output>.state_layout/, what `state tx index` "
               "writes) from the matrices in memory; the options below apply to it")
    p.add_argument("--layout-keys", "--layout_keys", dest="layout_keys", default=None,
                   help="comma-separated obsm matrices to copy (default X_hvg; add the embed_key you train on)")
    p.add_argument("--layout-seed", "--layout_seed", dest="layout_seed", type=int, default=None,
                   help="seed of the shuffle within each group (default 0)")
    _add_layout_columns(p, defaults=False)
    p.set_defaults(handler="state.cli.tx_handlers:preprocess_train")


LAYOUT_COLUMNS = {"pert_col": "gene", "cell_type_key": "cell_type", "batch_col": "gem_group"}


def _add_layout_columns(p, *, defaults: bool) -> None:
    """The layout's sort columns and folder, shared by `index` and `preprocess_train --write-layout`
    (which leaves them None when not given, so that it can refuse them without --write-layout)."""
    p.add_argument("--layout-dir", "--layout_dir", dest="layout_dir", default=None,
                   help="folder for the layouts (default: beside each file, <file>.state_layout); "
                   "training then needs data.kwargs.fast_loader_dir=<same folder>")
    for flag, name, what in (("pert-col", "pert_col", "perturbation"), ("cell-type-key", "cell_type_key", "cell type"),
                             ("batch-col", "batch_col", "batch")):
        default = f" (default {LAYOUT_COLUMNS[name]})" if not defaults else ""  # argparse shows set defaults
        p.add_argument(f"--{flag}", f"--{name}", dest=name, default=LAYOUT_COLUMNS[name] if defaults else None,
                       help=f"obs {what} column{default}: the training config's {name}")
    _bool_flag(p, "--by-batch", "--by_batch",
               help="sort by (cell type, perturbation, batch): contiguous groups for basal_mapping_strategy=batch")


def _add_preprocess_infer(sub) -> None:
    p = sub.add_parser("preprocess_infer", help="build a control template: perturbed cells get control expression")
    p.add_argument("--adata", required=True, help="input h5ad")
    p.add_argument("--output", required=True, help="output h5ad")
    p.add_argument("--control_condition", "--control-condition", dest="control_condition", required=True,
                   help="control label in --pert_col")
    p.add_argument("--pert_col", "--pert-col", dest="pert_col", required=True, help="obs column with perturbations")
    p.add_argument("--seed", type=int, default=42, help="RNG seed for control sampling")
    p.set_defaults(handler="state.cli.tx_handlers:preprocess_infer")


def _add_stats(sub) -> None:
    # Not in arc-state: summary tables and plots of a perturbation screen.
    p = sub.add_parser("stats", help="per-gene and per-perturbation statistics of an h5ad, as CSVs and plots")
    p.add_argument("--adata", required=True, help="input h5ad (statistics of X as stored)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                   help="folder for the CSV tables and PNG figures")
    p.add_argument("--pert-col", "--pert_col", dest="pert_col", default="gene", help="obs column with perturbations")
    p.add_argument("--control-pert", "--control_pert", dest="control_pert", default="non-targeting",
                   help="control label in --pert-col")
    p.add_argument("--celltype-col", "--celltype_col", dest="celltype_col", default=None,
                   help="obs column with cell types: counts per cell type, deltas against same-type controls")
    p.add_argument("--top-n", "--top_n", dest="top_n", type=int, default=20,
                   help="changed genes listed per perturbation in top_genes.csv")
    p.set_defaults(handler="state.cli.tx_handlers:stats")


def _add_index(sub) -> None:
    # Not in arc-state: the group-sorted training layout the fast set loader reads.
    p = sub.add_parser("index", help="write the fast training layout of every dataset a split TOML names")
    p.add_argument("--toml", required=True, help="split TOML; the layout of each of its h5/h5ad files is written")
    p.add_argument("--keys", default="X_hvg",
                   help="comma-separated matrices to copy: obsm keys (the embed_key, X_hvg when it is the target) "
                   "and X, the gene matrix (embed_key=null or output_space=all; kept sparse)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle within each group")
    _add_layout_columns(p, defaults=True)
    p.set_defaults(handler="state.cli.tx_handlers:index")
