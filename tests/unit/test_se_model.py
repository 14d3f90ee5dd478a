"""SE network pieces: layer math, permutation invariance, architecture round trips, key remapping, losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from state.emb.checkpoint import build_model_from_state_dict, infer_architecture, remap_state_dict
from state.emb.nn import (
    LOSS_NAMES,
    PostNormSelfAttentionLayer,
    SEArchitecture,
    StateEmbeddingNet,
    TabularLoss,
    build_loss,
    read_depth,
)


def _net(**overrides) -> StateEmbeddingNet:
    torch.manual_seed(0)
    num_datasets = 3 if overrides.get("dataset_correction", True) else 1  # no head -> not stored
    arch = SEArchitecture(token_dim=12, d_model=16, nhead=4, d_hid=24, nlayers=2, output_dim=8,
                          num_datasets=num_datasets, **overrides)
    net = StateEmbeddingNet(arch)
    net.set_gene_table(torch.randn(50, 12))
    return net.eval()


def test_layer_matches_torch_post_norm_encoder_layer():
    torch.manual_seed(1)
    ref = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, activation="gelu", batch_first=True).eval()
    ours = PostNormSelfAttentionLayer(16, 4, 24).eval()
    legacy = {f"transformer_encoder.layers.0.{k}": v for k, v in ref.state_dict().items()}
    remapped = remap_state_dict(legacy)
    ours.load_state_dict({k.split("layers.0.")[1]: v for k, v in remapped.items()})
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_cell_embedding_ignores_slot_order_and_is_normalised():
    net = _net()
    ids = torch.randint(0, 50, (2, 10))
    counts = torch.rand(2, 10) * 5
    perm = torch.cat([torch.tensor([0]), torch.randperm(9) + 1])
    with torch.no_grad():
        a, b = net(ids, counts), net(ids[:, perm], counts[:, perm])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert a.shape == (2, 18)
    torch.testing.assert_close(a[:, :8].norm(dim=1), torch.ones(2))


def test_slot_zero_gene_is_replaced_by_cls_but_its_count_matters():
    net = _net()
    ids = torch.randint(0, 50, (1, 10))
    counts = torch.rand(1, 10)
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 50
    more = counts.clone()
    more[0, 0] += 50.0
    with torch.no_grad():
        torch.testing.assert_close(net(ids, counts), net(other, counts))
        assert not torch.allclose(net(ids, counts), net(ids, more))


@pytest.mark.parametrize(
    "flags",
    [{}, {"counts": False}, {"rda": False}, {"dataset_correction": False}, {"rda": False, "counts": False}],
)
def test_architecture_inferred_from_state_dict(flags):
    net = _net(**flags)
    sd = net.state_dict()
    arch = infer_architecture(sd, nhead=4)
    assert arch == net.arch
    compiled = {k.replace("transformer_encoder.", "transformer_encoder._orig_mod."): v for k, v in sd.items()}
    rebuilt = build_model_from_state_dict(compiled, nhead=4, source="x")
    rebuilt.set_gene_table(net.pe_embedding.weight)
    rebuilt.eval()
    ids, counts = torch.randint(0, 50, (2, 6)), torch.rand(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, counts), net(ids, counts))
    assert arch.embedding_width == 8 + (10 if arch.dataset_correction else 0)


def test_shared_token_encoder_is_listed_twice():
    sd = _net().state_dict()
    assert torch.equal(sd["encoder.0.weight"], sd["gene_embedding_layer.0.weight"])
    assert "pe_embedding.weight" in sd and "count_encoder.2.weight" in sd


def test_decoder_shapes_and_inputs():
    net = _net()
    cell = torch.randn(3, 8)
    genes = net.gene_embeddings(torch.randint(0, 50, (3, 5)))
    assert genes.shape == (3, 5, 16)
    inputs = net.decoder_inputs(cell, genes, torch.tensor([1.0, 2.0, 3.0]), torch.randn(3, 10))
    assert inputs.shape == (3, 5, net.arch.decoder_input_dim)
    assert torch.equal(inputs[1, :, 16 + 8], torch.full((5,), 2.0))
    assert net.decode_genes(cell, genes, torch.ones(3), torch.randn(3, 10)).shape == (3, 5)
    with pytest.raises(ValueError, match="read_depth"):
        net.decode_genes(cell, genes, None, torch.randn(3, 10))
    assert net.dataset_logits(torch.randn(3, 8)).shape == (3, 3)


def test_tabular_loss_zero_on_match_and_differentiable():
    target = torch.rand(6, 20)
    loss = TabularLoss(shared=5)
    assert loss(target.clone(), target).abs().item() < 1e-5
    pred = torch.rand(6, 20, requires_grad=True)
    value = loss(pred, target)
    value.backward()
    assert value.item() > 0 and pred.grad is not None and torch.isfinite(pred.grad).all()
    # downsample groups cells: 6 cells / 2 copies -> 3 point clouds of 2 points
    assert TabularLoss(shared=5, downsample=2)(pred.detach(), target).item() > 0


def test_tabular_loss_single_points_is_euclidean_distance():
    pred, target = torch.zeros(1, 4), torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    assert math.isclose(TabularLoss(shared=0)(pred, target).item(), 5.0, rel_tol=1e-4)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_name_builds_and_runs(name):
    pred, target = torch.randn(4, 12, requires_grad=True), torch.rand(4, 12)
    value = build_loss(name, shared=4)(pred, target)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("nope")


def test_read_depth_is_mean_of_nonzero_and_zero_for_empty_cells():
    y = torch.tensor([[0.0, 2.0, 4.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(read_depth(y), torch.tensor([3.0, 0.0]))


def test_nanmean_skips_non_finite_terms_without_a_host_sync():
    """The SE loss's mean over finite terms (no `if tensor.any()` / boolean indexing on the device)."""
    import torch

    from state.emb.nn.losses import _nanmean

    values = torch.tensor([1.0, float("nan"), 3.0, float("inf")], requires_grad=True)
    mean = _nanmean(values)
    mean.backward()
    assert float(mean) == 2.0 and values.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    empty = torch.tensor([float("nan")] * 2, requires_grad=True)
    assert float(_nanmean(empty)) == 0.0 and _nanmean(empty).requires_grad
