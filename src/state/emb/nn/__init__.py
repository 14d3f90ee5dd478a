"""Plain ``nn.Module`` building blocks, the SE network and its training losses (no Lightning)."""

from __future__ import annotations

from state.emb.nn.layers import PostNormSelfAttentionLayer, SETransformerEncoder, SkipBlock
from state.emb.nn.losses import (
    LOSS_NAMES,
    MMDLoss,
    TabularLoss,
    build_loss,
    cross_entropy_loss,
    dataset_loss,
    kl_divergence_loss,
    mse_loss,
    read_depth,
    wasserstein_loss,
)
from state.emb.nn.model import DATASET_EMBED_DIM, SEArchitecture, StateEmbeddingNet

__all__ = [
    "DATASET_EMBED_DIM",
    "LOSS_NAMES",
    "MMDLoss",
    "PostNormSelfAttentionLayer",
    "SEArchitecture",
    "SETransformerEncoder",
    "SkipBlock",
    "StateEmbeddingNet",
    "TabularLoss",
    "build_loss",
    "cross_entropy_loss",
    "dataset_loss",
    "kl_divergence_loss",
    "mse_loss",
    "read_depth",
    "wasserstein_loss",
]
