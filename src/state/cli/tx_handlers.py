"""Thin handlers for ``state tx ...``: turn argparse results into calls of pure functions.

Each engine module is imported inside its handler so that ``state --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def train(args: argparse.Namespace) -> int:
    from state.tx.config import compose as config
    from state.tx.config.validate import validate_tx_config

    if args.help:
        print(config.train_help_text())
        return 0
    cfg = config.compose_tx_config(list(args.hydra_overrides))
    validate_tx_config(cfg)  # every config problem in one line, before the heavy imports
    from state.tx.train.run import train as run_train
    from state.utils.allocator import reuse_freed_memory

    reuse_freed_memory()  # this process only trains: keep freed activation blocks for the next step
    result = run_train(cfg)
    log.info("run directory: %s", result.run_dir)
    return 0


def predict(args: argparse.Namespace) -> int:
    from state.tx.predict.run import predict as run_predict

    result = run_predict(
        args.output_dir,
        toml=args.toml,
        checkpoint=args.checkpoint,
        test_time_finetune=args.test_time_finetune,
        profile=args.profile,
        predict_only=args.predict_only,
        skip_adatas=args.skip_adatas,
        shared_only=args.shared_only,
        eval_train_data=args.eval_train_data,
        pseudobulk=args.pseudobulk,
        stream_adatas=args.stream_adatas,
        scorer=args.scorer,
        preset=args.preset,
        baselines=args.baselines,
        eval_dir=args.eval_dir,
    )
    if result.metrics:
        from state.tx.predict.evaluate import format_summary

        print(format_summary(result.metrics))  # the command's result, so stdout
    if result.scores_eval2:
        from state.tx.predict.eval2 import format_eval2_summary

        print(format_eval2_summary(result.scores_eval2, preset=args.preset))
    if result.baselines is not None:
        from state.tx.predict.baselines import format_comparison

        print(format_comparison(result.baselines))
    log.info("results in %s", result.eval_dir)
    return 0


def infer(args: argparse.Namespace) -> int:
    from state.io.columns import ColumnChoices
    from state.tx.infer.edits import InputEdits
    from state.tx.infer.run import run_infer
    from state.utils.allocator import reuse_freed_memory

    reuse_freed_memory()  # this process only infers: keep freed activation blocks for the next batch
    columns = ColumnChoices(pert_col=args.pert_col, control_pert=args.control_pert, celltype_col=args.celltype_col,
                            batch_col=args.batch_col, embed_key=args.embed_key)
    edits = InputEdits(tsv=args.tsv, celltypes=args.celltypes, all_perts=args.all_perts,
                       virtual_cells_per_pert=args.virtual_cells_per_pert, min_cells=args.min_cells,
                       max_cells=args.max_cells)
    output = run_infer(
        model_dir=args.model_dir,
        adata_path=args.adata,
        output=args.output,
        checkpoint=args.checkpoint,
        columns=columns,
        edits=edits,
        seed=args.seed,
        max_set_len=args.max_set_len,
        quiet=args.quiet,
        unknown_as_control=args.unknown_as_control,
        global_control_fallback=args.global_control_fallback,
        counts_method=args.output_counts,
        verbose=args.verbose,
        full_genes=args.full_genes,
    )
    log.info("wrote %s", output)
    return 0


def _layout_options(args: argparse.Namespace):
    """``preprocess_train``'s layout flags as LayoutOptions (None without --write-layout)."""
    from state.tx.data.layout import LayoutOptions
    from state.utils.errors import StateError

    columns = ("pert_col", "cell_type_key", "batch_col", "layout_dir")
    given = [name for name in ("layout_keys", "layout_seed", *columns) if getattr(args, name) is not None]
    given += ["by_batch"] if args.by_batch else []
    if not args.write_layout:
        if given:
            raise StateError(f"--{given[0].replace('_', '-')} only applies to the training layout",
                             hint="add --write-layout, or leave the layout options out")
        return None
    defaults = LayoutOptions()
    keys = tuple(k.strip() for k in (args.layout_keys or "").split(",") if k.strip()) or defaults.keys
    seed = defaults.seed if args.layout_seed is None else args.layout_seed
    chosen = {name: getattr(args, name) or getattr(defaults, name) for name in columns}
    return LayoutOptions(keys=keys, seed=seed, by_batch=args.by_batch, **chosen)


def preprocess_train(args: argparse.Namespace) -> int:
    from state.tx.preprocess import preprocess_train as run

    layout = _layout_options(args)
    out = run(args.adata, args.output, num_hvgs=args.num_hvgs, input_is_log1p=args.input_is_log1p, layout=layout)
    log.info("wrote %s", out)
    return 0


def preprocess_infer(args: argparse.Namespace) -> int:
    from state.tx.preprocess import preprocess_infer as run

    out = run(
        args.adata,
        args.output,
        control_condition=args.control_condition,
        pert_col=args.pert_col,
        seed=args.seed,
    )
    log.info("wrote %s", out)
    return 0


def stats(args: argparse.Namespace) -> int:
    from state.tx.stats import run_stats

    run_stats(args.adata, args.output_dir, pert_col=args.pert_col, control_pert=args.control_pert,
              celltype_col=args.celltype_col, top_n=args.top_n)
    return 0


def index(args: argparse.Namespace) -> int:
    from state.tx.data.layout import index_toml
    from state.utils.errors import StateError

    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    try:
        index_toml(args.toml, keys=keys, pert_col=args.pert_col, cell_type_key=args.cell_type_key,
                   batch_col=args.batch_col, seed=args.seed, layout_dir=args.layout_dir,
                   by_batch=args.by_batch)  # logs each layout
    except PermissionError as exc:  # data shared read-only: the layout can go elsewhere
        raise StateError(f"cannot write the layout: {exc.filename}: permission denied",
                         hint="pass --layout-dir <writable folder>, then train with "
                         "data.kwargs.fast_loader_dir=<that folder>") from exc
    return 0
