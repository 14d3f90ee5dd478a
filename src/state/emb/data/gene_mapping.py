"""The gene vocabulary of an SE profile and each dataset's gene -> vocabulary mapping.

A profile (``embeddings.<name>`` in the config) names three files:

* ``all_embeddings``: dict gene -> 1-D vector; insertion order is the vocabulary index;
* ``ds_emb_mapping``: dict dataset -> LongTensor, one global index per gene of that dataset's
  ``X`` columns, -1 when the gene has no vector (a ``{}`` in the path is formatted with ``size``);
* ``valid_genes_masks`` (optional): dict dataset -> BoolTensor of usable genes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from state.emb.data.tables import DatasetEntry
from state.io.safe_load import safe_torch_load
from state.utils.errors import StateError

log = logging.getLogger(__name__)


@dataclass
class DatasetGenes:
    """One dataset's genes: global ids of the usable genes and where they sit in ``X``."""

    ds_emb_mapping: torch.Tensor  # [genes in X] global index or -1
    valid_mask: torch.Tensor  # [genes in X] bool
    global_to_local: torch.Tensor  # [vocabulary] column of X holding that gene, or -1
    valid_global_ids: torch.Tensor = field(init=False)  # [usable genes] global index, X column order

    def __post_init__(self) -> None:
        self.valid_global_ids = self.ds_emb_mapping[self.valid_mask]


def load_gene_embeddings(path: str | Path, *, key: str) -> dict[str, torch.Tensor]:
    """Load a dict gene -> 1-D float vector (``embeddings.<profile>.all_embeddings``)."""
    table = safe_torch_load(path, what=f"gene embedding file ({key})")
    if not isinstance(table, Mapping) or not table:
        raise StateError(
            f"{path} ({key}) holds {type(table).__name__}, expected a non-empty dict gene -> vector",
            hint="build it with `state emb preprocess` or torch.save({gene: tensor, ...}, path)",
        )
    out: dict[str, torch.Tensor] = {}
    width = None
    for gene, vector in table.items():
        vector = torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
        if width is None:
            width = vector.numel()
        elif vector.numel() != width:
            raise StateError(
                f"{path}: gene {gene} has a vector of width {vector.numel()}, others have {width}",
                hint="every gene vector must have the same length",
            )
        out[str(gene)] = vector
    return out


def stack_gene_embeddings(table: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The [vocabulary, width] token table in dict order."""
    return torch.stack(list(table.values())).to(torch.float32)


def load_mapping_file(path: str | Path | None, *, key: str) -> dict[str, torch.Tensor] | None:
    if path is None:
        return None
    table = safe_torch_load(path, what=f"{key} file")
    if not isinstance(table, Mapping):
        raise StateError(f"{path} ({key}) holds {type(table).__name__}, expected a dict dataset -> tensor")
    return {str(k): torch.as_tensor(v) for k, v in table.items()}


def build_dataset_genes(
    entries: Iterable[DatasetEntry],
    *,
    ds_emb_mapping: Mapping[str, torch.Tensor],
    valid_genes_masks: Mapping[str, torch.Tensor] | None,
    vocab_size: int,
    mapping_path: str,
) -> dict[str, DatasetGenes]:
    """Check every dataset against the profile and build its gene maps.

    Genes without a vector are dropped (logged with their count); a dataset missing from the
    mapping, with a mapping of the wrong length, or with no usable gene at all is an error.
    """
    genes: dict[str, DatasetGenes] = {}
    dropped: list[str] = []
    for entry in entries:
        if entry.name in genes:
            continue
        if entry.name not in ds_emb_mapping:
            raise StateError(
                f"dataset {entry.name} ({entry.path}) has no entry in the gene mapping {mapping_path}",
                hint="re-run `state emb preprocess` with the CSVs you train on",
            )
        mapping = torch.as_tensor(ds_emb_mapping[entry.name], dtype=torch.long).reshape(-1)
        mask = None
        if valid_genes_masks is not None and entry.name in valid_genes_masks:
            mask = torch.as_tensor(valid_genes_masks[entry.name], dtype=torch.bool).reshape(-1)
            if mask.numel() == entry.num_genes and mapping.numel() == int(mask.sum()) != entry.num_genes:
                # Some arc-state profiles store the mapping of the usable genes only.
                full = torch.full((entry.num_genes,), -1, dtype=torch.long)
                full[mask] = mapping
                mapping = full
        if mapping.numel() != entry.num_genes:
            raise StateError(
                f"dataset {entry.name}: the gene mapping has {mapping.numel()} genes, the table says "
                f"{entry.num_genes}",
                hint="re-run `state emb preprocess` so the CSV and the mapping agree",
            )
        if int(mapping.max()) >= vocab_size:
            raise StateError(
                f"dataset {entry.name}: the gene mapping refers to vocabulary index {int(mapping.max())}, "
                f"but the vocabulary has {vocab_size} genes",
                hint="use the ds_emb_mapping built together with this all_embeddings file",
            )
        valid = mapping >= 0
        if mask is not None and mask.numel() == mapping.numel():
            valid &= mask
        usable = int(valid.sum())
        if usable == 0:
            raise StateError(
                f"dataset {entry.name} ({entry.path}) has no gene with an embedding ({mapping.numel()} genes)",
                hint="check the gene names in var against the embedding file, or drop the dataset",
            )
        if usable < mapping.numel():
            dropped.append(f"{entry.name}: {mapping.numel() - usable} of {mapping.numel()}")
        reverse = torch.full((vocab_size,), -1, dtype=torch.long)
        columns = torch.arange(mapping.numel())
        reverse[mapping[valid]] = columns[valid]
        genes[entry.name] = DatasetGenes(ds_emb_mapping=mapping, valid_mask=valid, global_to_local=reverse)
    if dropped:
        log.warning("genes without an embedding are dropped (%s)", "; ".join(dropped))
    return genes
