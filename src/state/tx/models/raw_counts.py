"""Train and predict straight from raw counts (arc-state main, PR #274; off by default).

``model.kwargs.log1p_from_raw_counts=true`` turns every batch's expression tensors into
``log1p(counts * counts_target_sum / row_total)`` (float32; an all-zero row stays zero) before the
model sees them, so the h5ad can hold raw counts. ``pert_cell_counts`` is always transformed;
``ctrl_cell_emb`` / ``pert_cell_emb`` only when the model reads expression (``embed_key`` None or
``X_hvg``), never a learned embedding such as ``X_state``. The input tensors are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from state.utils.errors import StateError

ENABLE_KEY = "log1p_from_raw_counts"
TARGET_KEY = "counts_target_sum"
DEFAULT_TARGET = 10000.0
EXPRESSION_KEYS = ("ctrl_cell_emb", "pert_cell_emb")


def log1p_normalize(counts: torch.Tensor, target_sum: float) -> torch.Tensor:
    """Per row (last axis): clamp at 0, scale to ``target_sum`` in float32, log1p."""
    values = counts.to(torch.float32).clamp_min(0)
    total = values.sum(dim=-1, keepdim=True)
    scale = torch.where(total > 0, torch.tensor(target_sum, dtype=torch.float32, device=total.device) / total,
                        torch.zeros_like(total))
    return torch.log1p(values * scale)


@dataclass(frozen=True)
class RawCounts:
    enabled: bool = False
    target_sum: float = DEFAULT_TARGET
    embed_key: str | None = None

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], *, embed_key: str | None) -> RawCounts:
        enabled = bool(kwargs.get(ENABLE_KEY, False))
        target = float(kwargs.get(TARGET_KEY, DEFAULT_TARGET))
        if enabled and (not math.isfinite(target) or target <= 0):
            raise StateError(f"counts_target_sum must be positive and finite, got {target:g}",
                             hint="set model.kwargs.counts_target_sum to the library size to scale to, e.g. 10000")
        return cls(enabled=enabled, target_sum=target, embed_key=embed_key)

    @property
    def transforms_expression(self) -> bool:
        return self.enabled and self.embed_key in (None, "X_hvg")

    def apply(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The batch itself when disabled, else a shallow copy with the count keys transformed."""
        if not self.enabled:
            return batch
        keys = ("pert_cell_counts", *(EXPRESSION_KEYS if self.transforms_expression else ()))
        out = dict(batch)
        for key in keys:
            if isinstance(out.get(key), torch.Tensor):
                out[key] = log1p_normalize(out[key], self.target_sum)
        return out
