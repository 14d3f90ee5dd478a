"""Point-cloud losses that stay accurate under mixed precision.

geomloss computes every squared distance as |x|^2 + |y|^2 - 2 x.y, and the energy distance is a
small difference of large mean distances (2 E|X-Y| - E|X-X'| - E|Y-Y'|). Under bf16 autocast the
x.y matmul runs in bf16 (8 significant bits): on log1p expression over 2,000 genes (|x|^2 in the
thousands) the loss comes out several percent wrong. Two guards fix it:

* autocast is switched off and the inputs are cast to (at least) float32, and float32 matmuls run
  at "highest" precision inside the loss, so the matmul is full float32 whatever the Trainer's
  precision and ``STATE_MATMUL_PRECISION`` are (training's default, "medium", means TF32 on NVIDIA
  GPUs: 10 mantissa bits, the same hazard on a smaller scale; the loss's matmuls are a small share
  of a step);
* each pair of sets is shifted by its joint mean first. Pairwise distances, and so every kernel and
  transport cost, do not change, but |x|^2 shrinks from "norm of the expression" to "spread around
  the pair's mean", so far less cancels in float32 too.

In float32 the result equals the unguarded one up to round-off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from geomloss import SamplesLoss

__all__ = ["CentredSamplesLoss", "as_float32", "autocast_off", "ieee_float32_matmul"]


@contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Autocast disabled for ``device_type`` (a no-op where that device has no autocast)."""
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


@contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Float32 matmuls in full precision (no TF32 / bf16 passes) inside the block; restored after."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def as_float32(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y in one dtype, float32 or wider (float64 inputs stay float64)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dtype), y.to(dtype)


class CentredSamplesLoss(SamplesLoss):
    """geomloss ``SamplesLoss`` on two point clouds [..., N, D] x [..., M, D], computed in float32
    (autocast off) after subtracting the pair's joint mean. Same constructor, same result up to
    round-off; no parameters or buffers, so state dicts are unchanged."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with autocast_off(x.device.type), ieee_float32_matmul():
            x, y = as_float32(x, y)
            # The loss is translation invariant, so the shift carries no gradient: detached.
            centre = (x.sum(-2, keepdim=True) + y.sum(-2, keepdim=True)).detach() / (x.shape[-2] + y.shape[-2])
            return super().forward(x - centre, y - centre)
