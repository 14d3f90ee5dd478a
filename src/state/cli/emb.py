"""``state emb ...``: flags of arc-state 0.11.1 plus the July-2025 spellings as aliases."""

from __future__ import annotations


def add_parser(commands) -> None:
    emb = commands.add_parser("emb", help="State Embedding model: fit, transform, query, preprocess, eval")
    sub = emb.add_subparsers(dest="subcommand", required=True, metavar="{fit,transform,query,preprocess,eval}")
    _add_fit(sub)
    _add_transform(sub)
    _add_query(sub)
    _add_preprocess(sub)
    _add_eval(sub)


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="train (or continue training) the SE model")
    p.add_argument("--conf", default=None, help="YAML config; replaces the packaged state-defaults.yaml")
    p.add_argument("hydra_overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(handler="state.cli.emb_handlers:fit")


def _add_transform(sub) -> None:
    p = sub.add_parser("transform", help="embed the cells of an h5ad with an SE checkpoint")
    p.add_argument("--model-folder", "--model_folder", dest="model_folder", default=None,
                   help="folder with *.ckpt and protein_embeddings*.pt")
    p.add_argument("--checkpoint", default=None, help="explicit checkpoint (wins over the folder)")
    p.add_argument("--config", default=None, help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--input", required=True, action="append",
                   help="input h5ad; repeat it, or pass a folder (its *.h5ad) or a quoted glob, for several files")
    p.add_argument("--output", default=None, help=".h5ad (embeddings in obsm[--embed-key]) or .npy")
    p.add_argument("--embed-key", "--embed_key", dest="embed_key", default="X_state", help="obsm key")
    p.add_argument("--protein-embeddings", "--protein_embeddings", dest="protein_embeddings", default=None,
                   help=".pt dict gene name -> vector (overrides every other source)")
    p.add_argument("--lancedb", default=None, help="LanceDB folder to create or append to")
    p.add_argument("--lancedb-update", "--lancedb_update", dest="lancedb_update", action="store_true",
                   help="append to an existing table (always the behaviour; kept for compatibility)")
    p.add_argument("--lancedb-batch-size", "--lancedb_batch_size", dest="lancedb_batch_size", type=int,
                   default=1000, help="records per LanceDB write")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="cells per forward pass (default: model.batch_size)")
    p.add_argument("--gene-column", "--gene_column", dest="gene_column", default=None,
                   help="var column with gene names (default: auto-detect)")
    p.add_argument("--seed", type=int, default=None, help="seed gene sampling for bit-identical output")
    work = p.add_argument_group(
        "several files / processes / machines (resumable: finished work units are kept and skipped on a rerun)")
    work.add_argument("--shard", default=None, metavar="I/N",
                      help="compute only shard I of N (I from 0), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; "
                           "then run the command again with --merge")
    work.add_argument("--devices", type=int, default=None, metavar="K",
                      help="K local processes (one per GPU; gloo processes on CPU), merged at the end")
    work.add_argument("--merge", action="store_true", help="assemble the outputs once every shard is done")
    work.add_argument("--work-dir", "--work_dir", dest="work_dir", default=None,
                      help="work units and manifest (default: <output or lancedb>.parts)")
    work.add_argument("--unit-rows", "--unit_rows", dest="unit_rows", type=int, default=None,
                      help="rows per work unit, a multiple of 1024 (default 8192)")
    work.add_argument("--output-format", "--output_format", dest="output_format", choices=("h5ad", "npy"),
                      default=None, help="file type written per input when --output is a folder (default h5ad)")
    p.set_defaults(handler="state.cli.emb_handlers:transform")


def _add_query(sub) -> None:
    p = sub.add_parser("query", help="nearest cells in a LanceDB store for the cells of an h5ad")
    p.add_argument("--lancedb", required=True, help="existing LanceDB folder")
    p.add_argument("--input", required=True, help="h5ad with query vectors in obsm[--embed-key]")
    p.add_argument("--output", required=True, help=".csv or .parquet")
    p.add_argument("--k", type=int, default=3, help="neighbours per query cell")
    p.add_argument("--embed-key", "--embed_key", dest="embed_key", default="X_state", help="obsm key")
    p.add_argument("--exclude-distances", "--exclude_distances", dest="exclude_distances", action="store_true",
                   help="drop the distance column")
    p.add_argument("--filter", default=None, help="LanceDB where-expression on metadata columns")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=100,
                   help="query cells per search call")
    p.set_defaults(handler="state.cli.emb_handlers:query")


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="build SE profile files (gene embeddings, dataset mappings)")
    p.add_argument("--profile-name", "--profile_name", dest="profile_name", required=True)
    p.add_argument("--train-csv", "--train_csv", dest="train_csv", required=True, help="CSV species,path,names")
    p.add_argument("--val-csv", "--val_csv", dest="val_csv", required=True, help="CSV species,path,names")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    p.add_argument("--config-file", "--config_file", dest="config_file",
                   default="src/state/configs/state-defaults.yaml", help="YAML config to update")
    p.add_argument("--all-embeddings", "--all_embeddings", dest="all_embeddings", default=None,
                   help="dict gene -> vector (.pt); one-hot embeddings when absent")
    p.add_argument("--num-threads", "--num_threads", dest="num_threads", type=int, default=1)
    p.set_defaults(handler="state.cli.emb_handlers:preprocess")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perturbation and DE checks of an SE checkpoint on an h5ad")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--adata", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--pert-col", "--pert_col", dest="pert_col", default="gene")
    p.add_argument("--control-pert", "--control_pert", dest="control_pert", default="non-targeting")
    p.add_argument("--gene-column", "--gene_column", dest="gene_column", default="gene_name")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None)
    p.add_argument("--protein-embeddings", "--protein_embeddings", dest="protein_embeddings", default=None)
    p.set_defaults(handler="state.cli.emb_handlers:eval_")
