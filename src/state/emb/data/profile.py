"""Read the active SE profile from the config: vocabulary, gene mappings and dataset tables."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from state.emb.data.gene_mapping import (
    DatasetGenes,
    build_dataset_genes,
    load_gene_embeddings,
    load_mapping_file,
    stack_gene_embeddings,
)
from state.emb.data.tables import DatasetEntry, read_dataset_table
from state.utils.errors import StateError

log = logging.getLogger(__name__)


def embedding_profile(cfg):
    """``embeddings[embeddings.current]``, with a clear error when it is unset or unknown."""
    return _profile(cfg, "embeddings")


def dataset_profile(cfg):
    """``dataset[dataset.current]``, with a clear error when it is unset or unknown."""
    return _profile(cfg, "dataset")


def _profile(cfg, section: str):
    block = cfg.get(section)
    current = None if block is None else block.get("current")
    if current is None:
        raise StateError(
            f"{section}.current is not set",
            hint=f"pass {section}.current=<profile> (state emb preprocess prints the command)",
        )
    profile = block.get(str(current))
    if profile is None or not hasattr(profile, "get"):
        raise StateError(
            f"{section}.current={current} but the config has no {section}.{current} block",
            hint="run `state emb preprocess --profile-name ...` or add the block to --conf",
        )
    return profile


@dataclass
class TrainingProfile:
    """Everything the data pipeline and the model need from the profile files."""

    gene_embeddings: dict[str, torch.Tensor]
    train_entries: list[DatasetEntry]
    val_entries: list[DatasetEntry]
    genes: dict[str, DatasetGenes]

    @property
    def vocab_size(self) -> int:
        return len(self.gene_embeddings)

    @property
    def token_table(self) -> torch.Tensor:
        return stack_gene_embeddings(self.gene_embeddings)


def load_training_profile(cfg) -> TrainingProfile:
    """Load and cross-check the profile files named by ``embeddings.current`` / ``dataset.current``."""
    emb = embedding_profile(cfg)
    data = dataset_profile(cfg)
    current = cfg.embeddings.current
    ds_type = data.get("ds_type", "h5ad")
    if ds_type != "h5ad":
        raise StateError(f"dataset.{cfg.dataset.current}.ds_type={ds_type}; only h5ad is supported",
                         hint=f"set dataset.{cfg.dataset.current}.ds_type=h5ad")
    problems = [
        f"embeddings.{current}.{key} is not set"
        for key in ("all_embeddings", "ds_emb_mapping", "size", "num")
        if emb.get(key) is None
    ]
    problems += [f"dataset.{cfg.dataset.current}.{key} is not set" for key in ("train", "val") if data.get(key) is None]
    if problems:
        raise StateError("; ".join(problems), hint="run `state emb preprocess` to build a complete profile")
    vectors = load_gene_embeddings(emb.all_embeddings, key=f"embeddings.{current}.all_embeddings")
    width = next(iter(vectors.values())).numel()
    if int(emb.size) != width or int(emb.num) != len(vectors):
        raise StateError(
            f"embeddings.{current} says size={emb.size} num={emb.num}, but {emb.all_embeddings} holds "
            f"{len(vectors)} vectors of width {width}",
            hint=f"set embeddings.{current}.size={width} embeddings.{current}.num={len(vectors)}",
        )
    mapping_path = str(emb.ds_emb_mapping).replace("{}", str(emb.size))
    ds_mapping = load_mapping_file(mapping_path, key=f"embeddings.{current}.ds_emb_mapping")
    masks = load_mapping_file(emb.get("valid_genes_masks"), key=f"embeddings.{current}.valid_genes_masks")
    species = data.get("filter_by_species")
    train = read_dataset_table(data.train, split="train", filter_by_species=species)
    val = read_dataset_table(data.val, split="val", filter_by_species=species)
    genes = build_dataset_genes(
        [*train, *val], ds_emb_mapping=ds_mapping, valid_genes_masks=masks,
        vocab_size=len(vectors), mapping_path=mapping_path,
    )
    log.info(
        "profile %s: %d genes of width %d; %d train datasets (%d cells), %d val datasets (%d cells)",
        current, len(vectors), width, len(train), sum(e.num_cells for e in train),
        len(val), sum(e.num_cells for e in val),
    )
    return TrainingProfile(gene_embeddings=vectors, train_entries=train, val_entries=val, genes=genes)
