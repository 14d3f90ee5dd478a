"""Thin handlers for ``state tx ...``: turn argparse results into calls of pure functions.

Each engine module is imported inside its handler so that ``state --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def train(args: argparse.Namespace) -> int:
    from state.tx.config import compose as config

    if args.help:
        print(config.train_help_text())
        return 0
    cfg = config.compose_tx_config(list(args.hydra_overrides))
    config.validate_tx_config(cfg)  # every config problem in one line, before the heavy imports
    from state.tx.train.run import train as run_train
    from state.utils.allocator import reuse_freed_memory

    reuse_freed_memory()  # this process only trains: keep freed activation blocks for the next step
    result = run_train(cfg)
    log.info("run directory: %s", result.run_dir)
    return 0


def predict(args: argparse.Namespace) -> int:
    from state.tx.predict.run import predict_cli

    return predict_cli(args)


def infer(args: argparse.Namespace) -> int:
    from state.tx.infer.simulate import infer_cli
    from state.utils.allocator import reuse_freed_memory

    reuse_freed_memory()  # this process only infers: keep freed activation blocks for the next batch
    return infer_cli(args)


def preprocess_train(args: argparse.Namespace) -> int:
    from state.tx.preprocess import preprocess_train as run

    out = run(args.adata, args.output, num_hvgs=args.num_hvgs, input_is_log1p=args.input_is_log1p)
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
    from state.tx.stats import stats_cli

    return stats_cli(args)


def index(args: argparse.Namespace) -> int:
    from state.tx.data.layout import index_toml

    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    index_toml(args.toml, keys=keys, pert_col=args.pert_col, cell_type_key=args.cell_type_key,
               batch_col=args.batch_col, seed=args.seed, layout_dir=args.layout_dir,
               by_batch=args.by_batch)  # logs each layout
    return 0
