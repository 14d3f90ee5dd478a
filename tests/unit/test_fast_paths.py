"""Speed paths that must not change results: the set attention, fused Adam, malloc tuning."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from state.tx.nn.backbones import build_backbone


def _llama(n_heads: int, n_kv_heads: int) -> torch.nn.Module:
    kwargs = {"bidirectional_attention": True, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
              "head_dim": 8, "max_position_embeddings": 16, "n_positions": 16}
    torch.manual_seed(0)
    return build_backbone("llama", kwargs).eval()


def _through_hf_layers(model, x, mask=None):
    """Reference: HF's own decoder layers with the position-free rotary (cos = 1, sin = 0)."""
    head_dim = model.layers[0].self_attn.head_dim
    cos = x.new_ones(1, x.shape[1], head_dim)
    sin = x.new_zeros(1, x.shape[1], head_dim)
    hidden = x
    for layer in model.layers:
        out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin),
                    position_ids=torch.arange(x.shape[1]).unsqueeze(0))
        hidden = out[0] if isinstance(out, tuple) else out
    return model.norm(hidden)


@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 4), (4, 2)])
def test_set_attention_equals_hf_layers_with_no_op_rotary(n_heads, n_kv_heads):
    model = _llama(n_heads, n_kv_heads)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        got = model(inputs_embeds=x).last_hidden_state
        want = _through_hf_layers(model, x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        mask = torch.eye(11, dtype=torch.bool).view(1, 1, 11, 11)  # mask_attn
        torch.testing.assert_close(model(inputs_embeds=x, attention_mask=mask).last_hidden_state,
                                   _through_hf_layers(model, x, mask), rtol=0, atol=1e-6)
    # every cell attends to every other one: changing one cell moves the others
    y = x.clone()
    y[:, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(inputs_embeds=y).last_hidden_state[:, 1:], got[:, 1:])


def test_medium_precision_attention_takes_the_math_kernel_and_stays_close():
    from state.tx.nn.backbones import _math_sdpa_is_faster

    model = _llama(4, 4)
    x = torch.randn(2, 9, 32)
    previous = torch.get_float32_matmul_precision()
    try:
        assert not _math_sdpa_is_faster(x.device)
        with torch.no_grad():
            exact = model(inputs_embeds=x).last_hidden_state
        torch.set_float32_matmul_precision("medium")
        assert _math_sdpa_is_faster(x.device)
        with torch.no_grad():
            fast = model(inputs_embeds=x).last_hidden_state
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(fast, exact, rtol=0, atol=5e-2)  # bf16 matmul inputs at most


def test_state_models_train_with_fused_adam_on_cpu():
    from state.tx.models.base import adam

    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    fused = adam(params, lr=1e-2)
    assert fused.defaults["fused"] is True
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.Adam(ref_params, lr=1e-2)
    for step in range(3):
        for p, q in zip(params, ref_params, strict=True):
            p.grad = torch.full_like(p, 0.1 * (step + 1))
            q.grad = p.grad.clone()
        fused.step()
        ref.step()
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # same update rule
    assert set(fused.state_dict()["state"][0]) == set(ref.state_dict()["state"][0])  # same checkpoint layout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning applies to glibc only")
@pytest.mark.parametrize(("env", "expected"), [("1", "True True"), ("0", "False False")])
def test_malloc_tuning_applies_once_and_can_be_switched_off(env, expected):
    code = ("from state.utils.allocator import reuse_freed_memory as r; "
            "print(r(), r())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"STATE_MALLOC_TUNING": env, "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == expected
