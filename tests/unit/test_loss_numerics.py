"""The distributional losses under bf16 autocast: float32 inside, centred pairs, against float64.

geomloss forms squared distances as |x|^2 + |y|^2 - 2 x.y; under CPU bf16 autocast the x.y matmul
runs in bf16 and, on log1p expression over 2,000 genes, the energy distance (a small difference of
large mean distances) comes out percents off. Each test computes that old, unguarded path too and
asserts it misses the bound the guarded loss meets, so the tests fail without the guard.
"""

from __future__ import annotations

import pytest
import torch
from geomloss import SamplesLoss

from state.emb.nn.losses import TabularLoss
from state.tx.nn.losses import SetLoss
from state.utils.loss_numerics import CentredSamplesLoss

N_GENES = 2000
BOUND = 1e-3  # relative to float64


def _expression(n_sets: int, n_cells: int, *, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two groups of sets [n_sets, n_cells, 2000] of log1p(CP10k) Poisson counts; the second has
    ``shift`` (relative) more expression on random genes. Gene means are log-normal (a few highly
    expressed genes, most near zero), library sizes vary by cell."""
    g = torch.Generator().manual_seed(seed)
    gene_mean = torch.exp(torch.randn(N_GENES, generator=g) * 1.5 - 1.0)

    def draw(effect: torch.Tensor) -> torch.Tensor:
        library = torch.exp(torch.randn(n_sets, n_cells, 1, generator=g) * 0.3)
        counts = torch.poisson((gene_mean * effect * library).contiguous(), generator=g)
        return torch.log1p(counts / counts.sum(-1, keepdim=True).clamp(min=1) * 1e4)

    return draw(torch.ones(N_GENES)), draw(1 + shift * torch.rand(N_GENES, generator=g))


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference) / reference).abs().max().item()


@pytest.mark.parametrize("n_cells", [128, 512])
def test_energy_loss_under_bf16_autocast_matches_float64(n_cells):
    pred, target = _expression(2, n_cells, seed=n_cells, shift=0.2)
    reference = SamplesLoss("energy")(pred.double(), target.double())  # [2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guarded = SetLoss("energy")(pred, target)
        old = SamplesLoss("energy")(pred, target)  # what SetLoss computed before the guard
    assert guarded.dtype == torch.float32
    assert _relative_error(guarded, reference) < BOUND
    assert _relative_error(old, reference) > 10 * BOUND

    # the model's output itself is bf16 under autocast: the loss still works on those values exactly
    pred_bf16 = pred.to(torch.bfloat16)
    reference = SamplesLoss("energy")(pred_bf16.double(), target.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guarded = SetLoss("energy")(pred_bf16, target)
    assert _relative_error(guarded, reference) < BOUND


def test_centring_keeps_float32_results_and_gradients():
    pred, target = _expression(2, 128, seed=1, shift=0.2)
    pred.requires_grad_(True)
    plain = SamplesLoss("energy")(pred, target)
    centred = CentredSamplesLoss("energy")(pred, target)
    torch.testing.assert_close(centred, plain, rtol=BOUND, atol=0)  # both float32: differ by round-off only
    # float64: the shift is exact and carries no gradient (the loss is translation invariant)
    p64 = pred.detach().double().requires_grad_(True)
    (grad_plain,) = torch.autograd.grad(SamplesLoss("energy")(p64, target.double()).sum(), p64)
    (grad_centred,) = torch.autograd.grad(CentredSamplesLoss("energy")(p64, target.double()).sum(), p64)
    torch.testing.assert_close(grad_centred, grad_plain, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["sinkhorn", "se", "mse"])
def test_other_set_losses_run_in_float32_under_autocast(kind):
    pred, target = _expression(1, 128, seed=2, shift=0.2)
    loss = SetLoss(kind)
    reference = loss(pred.double(), target.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(pred.to(torch.bfloat16), target)
    assert value.dtype == torch.float32
    reference = loss(pred.to(torch.bfloat16).double(), target.double())
    assert _relative_error(value, reference) < BOUND


def test_se_tabular_loss_under_bf16_autocast_matches_float64():
    """SE's loss: per-cell energy distances over genes; predictions close to targets (late in training)."""
    target, _ = _expression(1, 256, seed=3)
    target = target[0]  # [cells, genes]
    pred = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(4))
    reference = TabularLoss(shared=512)(pred.double(), target.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guarded = TabularLoss(shared=512)(pred, target)
        old_cell_term = SamplesLoss("energy")(pred.reshape(-1, 1, N_GENES), target.reshape(-1, 1, N_GENES))
    assert _relative_error(guarded, reference) < BOUND
    old_reference = SamplesLoss("energy")(pred.double().reshape(-1, 1, N_GENES), target.double().reshape(-1, 1, N_GENES))
    assert _relative_error(old_cell_term.mean(), old_reference.mean()) > 10 * BOUND


def test_the_loss_runs_its_matmuls_at_highest_precision_and_restores_the_setting():
    """Training's default "medium" means TF32 on NVIDIA GPUs; geomloss's distance matmul must not use it."""
    seen = []
    pred, target = torch.rand(1, 8, 5), torch.rand(1, 8, 5)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        original = torch.matmul

        def spy(*args, **kwargs):
            seen.append(torch.get_float32_matmul_precision())
            return original(*args, **kwargs)

        torch.matmul = spy
        try:
            CentredSamplesLoss("energy")(pred, target)
        finally:
            torch.matmul = original
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
