"""Extra tokens appended to or prepended before a cell set.

* Confidence token (``confidence_token=True``): one learned token appended after the cells; its
  backbone output goes through a small head that predicts the set's loss (a confidence score).
  Checkpoint keys: ``confidence_token.confidence_token`` [1, 1, H] and
  ``confidence_token.confidence_projection.{0,1,4,5,8}.*``.
* Batch token (``use_batch_token=True``): one learned token prepended before the cells; its output
  is classified into the experimental batch (an auxiliary loss). Keys: ``batch_token`` [1, 1, H]
  and ``batch_classifier.0.*`` (owned by the State Transition net).
"""

from __future__ import annotations

import torch
from torch import nn


def prepend_token(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """[B, S, H] + token [1, 1, H] -> [B, 1 + S, H]."""
    return torch.cat([token.expand(x.shape[0], 1, x.shape[2]), x], dim=1)


def append_token(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """[B, S, H] + token [1, 1, H] -> [B, S + 1, H]."""
    return torch.cat([x, token.expand(x.shape[0], 1, x.shape[2])], dim=1)


class ConfidenceToken(nn.Module):
    """A learned token plus the head that turns its output into a non-negative score."""

    def __init__(self, hidden_dim: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.confidence_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        half, quarter = max(hidden_dim // 2, 1), max(hidden_dim // 4, 1)
        self.confidence_projection = nn.Sequential(
            nn.Linear(hidden_dim, half),
            nn.LayerNorm(half),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(half, quarter),
            nn.LayerNorm(quarter),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(quarter, 1),
            nn.ReLU(),
        )

    def append(self, x: torch.Tensor) -> torch.Tensor:
        return append_token(x, self.confidence_token)  # [B, S + 1, H]

    def score(self, token_output: torch.Tensor) -> torch.Tensor:
        return self.confidence_projection(token_output)  # [B, H] -> [B, 1]
