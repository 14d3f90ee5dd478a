"""SE training data: dataset tables, streaming h5ad rows, gene mappings, sentence collation."""

from state.emb.data.collator import SentenceCollator, SentenceSpec
from state.emb.data.dataset import H5adCellDataset
from state.emb.data.gene_mapping import DatasetGenes, build_dataset_genes, load_gene_embeddings
from state.emb.data.h5_reader import H5RowReader
from state.emb.data.profile import TrainingProfile, dataset_profile, embedding_profile, load_training_profile
from state.emb.data.tables import DatasetEntry, read_dataset_table

__all__ = [
    "DatasetEntry",
    "DatasetGenes",
    "H5RowReader",
    "H5adCellDataset",
    "SentenceCollator",
    "SentenceSpec",
    "TrainingProfile",
    "build_dataset_genes",
    "dataset_profile",
    "embedding_profile",
    "load_gene_embeddings",
    "load_training_profile",
    "read_dataset_table",
]
