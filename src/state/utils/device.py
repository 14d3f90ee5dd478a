"""Where inference runs: CUDA when present, else Apple MPS, else CPU (``STATE_DEVICE`` overrides).

Training leaves the choice to Lightning (``accelerator="auto"``); ``predict`` and ``infer`` run the
model directly, so they ask here. Batches are dicts of tensors and string lists; only the tensors
move (walking thousands of names per batch costs more than the model step on CPU).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def inference_device() -> torch.device:
    requested = os.environ.get("STATE_DEVICE")
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move the tensors of a batch dict to ``device``; everything else is passed through."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
