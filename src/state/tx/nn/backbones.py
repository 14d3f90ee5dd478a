"""Set-transformer backbones built from HuggingFace ``transformers`` configs.

The backbone sees one *set* of cells as a sequence of token embeddings (``inputs_embeds``); it
never sees token ids or positions. Both classes subclass the HuggingFace model so the module tree
(and therefore the checkpoint keys ``transformer_backbone.*``) is exactly arc-state's, but they run
their own short ``forward`` over the HF layers. That keeps behaviour identical on transformers
4.5x and 5.x, whose top-level ``forward``/mask plumbing differ (arc-state's GPT2 patch does not
even construct on 5.x).

Attention semantics (decided here, documented because they differ between backbones):

* ``llama`` with ``bidirectional_attention: true`` (all ``state*`` configs): every cell attends to
  every cell, no positional information (arc-state's cos=1 / sin=0 rotary, an exact no-op, is
  skipped). Outputs are permutation-equivariant over the set and any set length works. Without the flag: a plain causal
  Llama with RoPE, as in arc-state.
* ``GPT2`` (``pertsets``): arc-state 0.11.1 *intends* bidirectional attention but, as observed in
  its fixtures (transformers 4.57), the attention is CAUSAL: cell j attends to cells <= j. To
  reproduce arc-state checkpoints, GPT2 is causal unless ``transformer_backbone_kwargs`` holds
  ``bidirectional_attention: true`` (absent in arc-state's configs), which gives true
  bidirectional attention for new runs.
* ``wte``/``wpe`` (GPT2) and ``embed_tokens`` (llama) are zeroed and frozen; they stay in the
  state_dict for compatibility. The zero position table is never added (adding zeros is a no-op),
  so sets longer than ``wpe`` work and a confidence token never overflows it. New GPT2 runs size
  ``wpe`` to ``cell_set_len + extra_tokens``; arc-state checkpoints (whose ``wpe`` has
  ``cell_set_len`` rows) are loaded with their own shape via :func:`match_position_table`.
* ``mask_attn``: an identity mask is passed, so each token attends only to itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel
from transformers.modeling_outputs import BaseModelOutput

from state.utils.errors import StateError

log = logging.getLogger(__name__)

BACKBONE_KEYS = ("llama", "GPT2")


def _layer_output(out: Any) -> torch.Tensor:
    # transformers 4.5x layers return a tuple, 5.x a tensor.
    return out[0] if isinstance(out, tuple) else out


def identity_attention_mask(n_tokens: int, device: torch.device) -> torch.Tensor:
    """Boolean [1, 1, S, S] mask letting each token attend only to itself."""
    return torch.eye(n_tokens, dtype=torch.bool, device=device).view(1, 1, n_tokens, n_tokens)


def _math_sdpa_is_faster(device: torch.device) -> bool:
    # On CPU, once float32 matmuls may run in bf16 ("medium"/"high" precision, which training sets
    # as arc-state does), PyTorch's fused flash SDPA kernel is ~4x slower (forward + backward) than
    # the plain math kernel; at "highest" the two are equally fast, so the default is kept there.
    return device.type == "cpu" and torch.get_float32_matmul_precision() != "highest"


def _set_attention(attn: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Non-causal attention of one LlamaAttention with no positional rotation (its cos=1/sin=0 rotary
    is an exact no-op, so it is skipped); same projections, scaling and SDPA call as HF's."""
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    query = attn.q_proj(hidden).view(shape).transpose(1, 2)  # [B, heads, S, head_dim]
    key = attn.k_proj(hidden).view(shape).transpose(1, 2)  # [B, kv_heads, S, head_dim]
    value = attn.v_proj(hidden).view(shape).transpose(1, 2)
    options = {
        "attn_mask": mask,
        "dropout_p": attn.attention_dropout if attn.training else 0.0,
        "scale": attn.scaling,
        "enable_gqa": key.shape[1] != query.shape[1],
    }
    if _math_sdpa_is_faster(hidden.device):
        with sdpa_kernel([SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(query, key, value, **options)
    else:
        out = F.scaled_dot_product_attention(query, key, value, **options)
    return attn.o_proj(out.transpose(1, 2).reshape(*hidden.shape[:-1], -1))  # [B, S, H]


class SetLlamaModel(LlamaModel):
    """LlamaModel over a set of cell embeddings (see the module docstring)."""

    def __init__(self, config: LlamaConfig, *, bidirectional: bool) -> None:
        super().__init__(config)
        self.bidirectional = bool(bidirectional)
        if self.bidirectional:
            for layer in self.layers:
                layer.self_attn.is_causal = False

    def forward(  # type: ignore[override]
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> BaseModelOutput:
        hidden = inputs_embeds  # [B, S, H]
        layers = self.layers[: self.config.num_hidden_layers]
        if self.bidirectional:
            # The HF decoder layer's own steps, with the position-free attention above.
            for layer in layers:
                normed = layer.input_layernorm(hidden)
                hidden = hidden + _set_attention(layer.self_attn, normed, attention_mask)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            return BaseModelOutput(last_hidden_state=self.norm(hidden))  # [B, S, H]
        n_tokens = hidden.shape[1]
        position_ids = torch.arange(n_tokens, device=hidden.device).unsqueeze(0)  # [1, S]
        position_embeddings = self.rotary_emb(hidden, position_ids)  # (cos, sin) [1, S, head_dim]
        # Causal llama with RoPE (arc-state's non-bidirectional configs): HF's own layers.
        for layer in layers:
            hidden = _layer_output(
                layer(
                    hidden,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    position_embeddings=position_embeddings,
                )
            )
        return BaseModelOutput(last_hidden_state=self.norm(hidden))  # [B, S, H]


class SetGPT2Model(GPT2Model):
    """GPT2Model over a set of cell embeddings (see the module docstring)."""

    def __init__(self, config: GPT2Config, *, bidirectional: bool) -> None:
        super().__init__(config)
        self.bidirectional = bool(bidirectional)

    def forward(  # type: ignore[override]
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> BaseModelOutput:
        n_tokens = inputs_embeds.shape[1]
        if attention_mask is None:
            # Always explicit: transformers 4.x GPT2 turns a missing mask into causal attention.
            allowed = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=inputs_embeds.device)
            if not self.bidirectional:
                allowed = torch.tril(allowed)
            attention_mask = allowed.view(1, 1, n_tokens, n_tokens)
        hidden = self.drop(inputs_embeds)  # [B, S, H]; the zero position table is not added
        for block in self.h:
            hidden = _layer_output(block(hidden, attention_mask=attention_mask))
        return BaseModelOutput(last_hidden_state=self.ln_f(hidden))  # [B, S, H]


def _freeze_zero(embedding: nn.Embedding) -> None:
    with torch.no_grad():
        embedding.weight.zero_()
    embedding.weight.requires_grad_(False)


def _use_sdpa(model: nn.Module) -> None:
    # Our forward only ever needs SDPA (explicit masks or is_causal); eager GPT2 on 4.x would
    # apply its own causal buffer, so never fall back to it.
    model.config._attn_implementation = "sdpa"


def build_backbone(key: str, backbone_kwargs: Mapping[str, Any]) -> nn.Module:
    """Build the backbone for ``transformer_backbone_key`` from its kwargs (not mutated).

    ``backbone_kwargs`` must already contain ``n_positions`` (set by the model constructor).
    """
    kwargs = dict(backbone_kwargs)
    bidirectional = bool(kwargs.pop("bidirectional_attention", False))
    name = str(key).lower()
    if name == "llama":
        model: nn.Module = SetLlamaModel(LlamaConfig(**kwargs), bidirectional=bidirectional)
        _freeze_zero(model.embed_tokens)
    elif name == "gpt2":
        rows = max(int(kwargs.get("n_positions") or 0), int(kwargs.get("max_position_embeddings") or 0), 1)
        kwargs["n_positions"] = kwargs["max_position_embeddings"] = rows
        kwargs.pop("d_inner", None)  # not a GPT2 argument (the MLP width is 4 * n_embd)
        model = SetGPT2Model(GPT2Config(**kwargs), bidirectional=bidirectional)
        _freeze_zero(model.wte)
        _freeze_zero(model.wpe)
    else:
        raise StateError(
            f"unknown transformer_backbone_key '{key}'",
            hint=f"set model.kwargs.transformer_backbone_key to one of {', '.join(BACKBONE_KEYS)}",
        )
    _use_sdpa(model)
    log.debug("built %s backbone (bidirectional=%s)", key, bidirectional)
    return model


def base_backbone(backbone: nn.Module) -> nn.Module:
    """The HF model inside a (possibly LoRA-wrapped) backbone."""
    inner = backbone
    while hasattr(inner, "base_model") and inner.base_model is not inner:
        inner = inner.base_model
        if hasattr(inner, "model") and isinstance(inner.model, SetLlamaModel | SetGPT2Model):
            return inner.model
    return inner


def match_position_table(backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Give a GPT2 backbone's frozen zero ``wpe`` the row count stored in ``state_dict``.

    arc-state GPT2 checkpoints have ``cell_set_len`` rows (a config-alias quirk); ours have
    ``cell_set_len + extra_tokens``. The table is never read, only its shape must match.
    """
    model = base_backbone(backbone)
    if not isinstance(model, SetGPT2Model):
        return
    for key, value in state_dict.items():
        if key.startswith(prefix) and key.endswith("wpe.weight"):
            if tuple(value.shape) != tuple(model.wpe.weight.shape):
                device = model.wpe.weight.device
                model.wpe = nn.Embedding(value.shape[0], value.shape[1]).to(device)
                _freeze_zero(model.wpe)
            return


def lora_target_modules(key: str, *, target: Any, adapt_mlp: bool) -> list[str]:
    """Module names LoRA adapts: explicit ``target`` list, or the defaults per backbone."""
    if target not in (None, "auto"):
        return [target] if isinstance(target, str) else list(target)
    if str(key).lower() == "llama":
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
        return names + (["gate_proj", "up_proj", "down_proj"] if adapt_mlp else [])
    names = ["c_attn", "c_proj"]
    return names + (["mlp.c_fc", "mlp.c_proj"] if adapt_mlp else [])


def apply_lora(backbone: nn.Module, key: str, lora: Mapping[str, Any]) -> nn.Module:
    """Wrap the backbone with peft LoRA adapters (keys gain ``base_model.model`` / ``lora_A``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(lora.get("r", 16)),
        lora_alpha=int(lora.get("alpha", 32)),
        lora_dropout=float(lora.get("dropout", 0.05)),
        bias=str(lora.get("bias", "none")),
        target_modules=lora_target_modules(
            key, target=lora.get("target", "auto"), adapt_mlp=bool(lora.get("adapt_mlp", False))
        ),
        task_type=lora.get("task_type", "FEATURE_EXTRACTION"),
        fan_in_fan_out=str(key).lower() == "gpt2",  # GPT2 Conv1D stores weights [in, out]
    )
    return get_peft_model(backbone, config)
