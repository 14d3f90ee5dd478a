"""Which Adam update the tx models get: fused unless 16-mixed's GradScaler must unscale before clipping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from state.tx.models.base import PerturbationModel, adam


def _owner(plugin, clip):
    return SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=plugin, gradient_clip_val=clip))


@pytest.mark.parametrize(
    ("plugin", "clip", "must_unscale"),
    [
        (Precision(), 10.0, False),
        (MixedPrecision("bf16-mixed", "cpu"), 10.0, False),
        (MixedPrecision("16-mixed", "cpu"), 10.0, True),
        (MixedPrecision("16-mixed", "cpu"), 0.0, False),  # no clipping: the scaler hands the fused step its scale
    ],
)
def test_only_a_scaler_with_clipping_turns_fusion_off(plugin, clip, must_unscale):
    assert PerturbationModel._scaler_must_unscale(_owner(plugin, clip)) is must_unscale


def test_adam_fused_on_cpu_default_otherwise():
    params = [torch.nn.Parameter(torch.randn(3))]
    assert adam(params, lr=1e-3).defaults["fused"] is True
    plain = adam(params, lr=1e-3, fused=False).defaults
    assert plain["fused"] is None and plain["foreach"] is None  # CPU: torch's default loop, as before


def test_bf16_mixed_clips_a_fused_optimizer_instead_of_refusing():
    weight = torch.nn.Parameter(torch.zeros(4))
    weight.grad = torch.full((4,), 10.0)  # norm 20
    optimizer = adam([weight], lr=1e-3)
    plugin = MixedPrecision("bf16-mixed", "cpu")
    with pytest.raises(RuntimeError, match="fused"):  # Lightning's own rule, meant for 16-mixed's GradScaler
        plugin.clip_gradients(optimizer, 1.0)
    owner = SimpleNamespace(trainer=SimpleNamespace(precision_plugin=plugin))
    PerturbationModel.configure_gradient_clipping(owner, optimizer, 1.0, "norm")
    torch.testing.assert_close(weight.grad.norm(), torch.tensor(1.0), rtol=1e-4, atol=0)
