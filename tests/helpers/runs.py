"""Hydra overrides shared by tests that train tiny runs."""

from __future__ import annotations

# The tiny llama State Transition model of the arc-state fixture tx/state_llama (see its README).
TINY_STATE = ["model=state", "model.kwargs.cell_set_len=8", "model.kwargs.hidden_dim=32",
              "model.kwargs.transformer_backbone_kwargs.intermediate_size=64",
              "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2",
              "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
              "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
              "model.kwargs.transformer_backbone_kwargs.head_dim=8", "+model.kwargs.decoder_hidden_dims=[48,48]"]
