"""Thin handlers for ``state emb ...``: turn argparse results into calls of pure functions.

Each engine module is imported inside its handler so that ``state --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

log = logging.getLogger(__name__)


def fit(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from state.emb.config import check_emb_config, compose_emb_config

    cfg = compose_emb_config(args.conf, list(args.hydra_overrides or []))
    check_emb_config(cfg, for_fit=True)
    log.info("SE training config:\n%s", OmegaConf.to_yaml(cfg))
    from state.emb.fit import fit as run_fit

    run_fit(cfg)
    return 0


def _is_plain_transform(args: argparse.Namespace) -> bool:
    """One existing file and none of the sharding flags: the original single-process transform."""
    from pathlib import Path

    sharding = (args.shard, args.devices, args.work_dir, args.unit_rows, args.output_format)
    return (len(args.input) == 1 and not args.merge and all(v is None for v in sharding)
            and not Path(args.input[0]).is_dir() and (Path(args.input[0]).exists() or not any(c in args.input[0] for c in "*?[")))


def transform(args: argparse.Namespace) -> int:
    if args.lancedb_update:
        log.debug("--lancedb-update: the table is always appended to")
    common = dict(
        output=args.output, lancedb=args.lancedb, model_folder=args.model_folder,
        checkpoint=args.checkpoint, config=args.config, embed_key=args.embed_key,
        protein_embeddings=args.protein_embeddings, batch_size=args.batch_size,
        gene_column=args.gene_column, seed=args.seed, lancedb_batch_size=args.lancedb_batch_size,
    )
    if _is_plain_transform(args):
        from state.emb.transform import transform as run_transform

        run_transform(args.input[0], **common)
        return 0
    from state.emb.sharded import transform_many
    from state.emb.transform import DEFAULT_CHUNK_ROWS
    from state.emb.work_units import parse_shard

    result = transform_many(
        args.input, **common, shard=parse_shard(args.shard), devices=args.devices, merge=args.merge,
        work_dir=args.work_dir, unit_rows=args.unit_rows or DEFAULT_CHUNK_ROWS,
        output_format=args.output_format or "h5ad",
    )
    log.info("%d work units computed by this run", result.computed_units)
    return 0


def query(args: argparse.Namespace) -> int:
    from state.emb.vectordb import query as run_query

    run_query(args.lancedb, args.input, args.output, k=args.k, embed_key=args.embed_key,
              exclude_distances=args.exclude_distances, filter=args.filter, batch_size=args.batch_size)
    return 0


def preprocess(args: argparse.Namespace) -> int:
    from state.emb.preprocess import preprocess as run_preprocess

    run_preprocess(
        profile_name=args.profile_name,
        train_csv=args.train_csv,
        val_csv=args.val_csv,
        output_dir=args.output_dir,
        config_file=args.config_file,
        all_embeddings=args.all_embeddings,
        num_threads=args.num_threads,
    )
    return 0


def _mean_sem(values) -> str:
    values = np.asarray(list(values), dtype=float)
    if values.size == 0:
        return "n/a (no perturbation with both DE and non-DE genes)"
    sem = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else 0.0
    return f"{values.mean():.4f} ± {sem:.4f} (n={values.size})"


def eval_(args: argparse.Namespace) -> int:
    from state.emb.evaluate import evaluate

    result = evaluate(
        args.adata, checkpoint=args.checkpoint, config=args.config, pert_col=args.pert_col,
        control_pert=args.control_pert, gene_column=args.gene_column, batch_size=args.batch_size,
        protein_embeddings=args.protein_embeddings,
    )
    # the command's result, so stdout
    print(f"Mean top-{result.top_k} DE overlap: {result.mean_overlap:.4f} over {len(result.overlaps)} perturbations")
    print(f"ROC AUC: {_mean_sem(result.roc_auc.values())}")
    print(f"PR AUC: {_mean_sem(result.pr_auc.values())}")
    return 0
