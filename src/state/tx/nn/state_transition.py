"""The State Transition network as a plain ``nn.Module`` (no Lightning).

One forward call maps B cell sets to predicted perturbed states:

    basal (control) cells [B, S, D_in] --basal_encoder--> c [B, S, H]
    perturbation vectors  [B, S, P]    --pert_encoder---> p [B, S, H]
    x = p + c (+ batch_encoder(batch index))  -> optional batch / confidence tokens
    r = transformer_backbone(x) (cells attend to the set)  [B, S, H]
    y = project_out(r + c)  (predict_residual)  -> [B, S, D_out], ReLU for expression outputs

Submodule names are the checkpoint keys of arc-state 0.11.1 (``pert_encoder``, ``basal_encoder``,
``transformer_backbone``, ``project_out``, ``final_down_then_up``, ``batch_encoder``,
``batch_token``, ``batch_classifier``, ``confidence_token``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from state.tx.config.architecture import TransitionConfig
from state.tx.nn.backbones import apply_lora, build_backbone, identity_attention_mask
from state.tx.nn.mlp import activation_class, build_mlp
from state.tx.nn.tokens import ConfidenceToken, prepend_token

log = logging.getLogger(__name__)


def transition_net_kwargs(hparams: Mapping[str, Any], *, has_gene_decoder: bool) -> dict[str, Any]:
    """:class:`StateTransitionNet` keyword arguments from a tx model's flat hyper-parameters.

    ``hparams`` is the checkpoint's ``hyper_parameters`` (or the LightningModule's constructor
    keywords): the one place that decides how config keys and their defaults shape the network, used
    both when training (inside Lightning) and when ``infer`` rebuilds the net without Lightning.
    ``has_gene_decoder``: whether the model was built with a gene decoder (it decides the final ReLU).
    The shapes (dims, backbone, positions) come from :class:`TransitionConfig`.
    """
    arch = TransitionConfig.from_hparams(hparams)
    use_batch_token = bool(hparams.get("use_batch_token", False))
    if use_batch_token and (
        hparams.get("batch_encoder", False) or hparams.get("basal_mapping_strategy", "random") == "random"
    ):
        log.info("use_batch_token disabled (it needs batch-matched controls and no batch encoder)")
        use_batch_token = False
    return {
        "input_dim": arch.input_dim,
        "hidden_dim": arch.hidden_dim,
        "output_dim": arch.output_dim,
        "pert_dim": arch.pert_dim,
        "batch_dim": arch.batch_dim,
        "backbone_key": arch.backbone_key,
        "backbone_kwargs": arch.backbone_hparams(),
        "n_encoder_layers": int(hparams.get("n_encoder_layers", 2)),
        "n_decoder_layers": int(hparams.get("n_decoder_layers", 2)),
        "dropout": float(hparams.get("dropout", 0.1)),
        "activation": hparams.get("activation", "gelu"),
        "use_basal_projection": bool(hparams.get("use_basal_projection", True)),
        "predict_residual": bool(hparams.get("predict_residual", True)),
        "output_space": hparams.get("output_space", "gene"),
        "use_batch_encoder": bool(hparams.get("batch_encoder", False)),
        "use_batch_token": use_batch_token,
        "use_confidence_token": bool(hparams.get("confidence_token", False)),
        "mask_attn": bool(hparams.get("mask_attn", False)),
        "final_relu": hparams.get("embed_key") in (None, "X_hvg") or not has_gene_decoder,
        "lora": hparams.get("lora"),
        "freeze_backbone": bool(hparams.get("freeze_pert_backbone", hparams.get("freeze_pert", False))),
    }


def adopt_net_parts(owner: nn.Module, net: nn.Module) -> None:
    """Register ``net``'s parts directly on ``owner`` so checkpoint keys carry no ``net.`` prefix.

    ``owner.net`` still reaches the net (for its forward) without being a submodule itself.
    """
    for name, child in net._modules.items():
        owner.register_module(name, child)
    for name, param in net._parameters.items():
        owner.register_parameter(name, param)
    object.__setattr__(owner, "net", net)


@dataclass
class TransitionOutput:
    preds: torch.Tensor  # [B, S, output_dim]
    confidence: torch.Tensor | None = None  # [B, 1] predicted per-set loss
    batch_logits: torch.Tensor | None = None  # [B, batch_dim] from the batch token


class StateTransitionNet(nn.Module):
    """Set transformer from control cells + perturbation to perturbed cells."""

    # forward accepts pert [B, 1, P] (one perturbation per set) and broadcasts it over the set.
    set_level_perturbation = True

    def __init__(
        self,
        *,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        pert_dim: int,
        backbone_key: str,
        backbone_kwargs: Mapping[str, Any],
        batch_dim: int | None = None,
        n_encoder_layers: int = 1,
        n_decoder_layers: int = 1,
        dropout: float = 0.1,
        activation: str = "gelu",
        use_basal_projection: bool = True,
        predict_residual: bool = True,
        output_space: str = "gene",
        use_batch_encoder: bool = False,
        use_batch_token: bool = False,
        use_confidence_token: bool = False,
        mask_attn: bool = False,
        final_relu: bool = True,
        lora: Mapping[str, Any] | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        act = activation_class(activation)
        mlp = {"hidden_dim": hidden_dim, "dropout": dropout, "activation": act}
        self.predict_residual = bool(predict_residual)
        self.output_space = output_space
        self.mask_attn = bool(mask_attn)

        self.pert_encoder = build_mlp(pert_dim, hidden_dim, n_layers=n_encoder_layers, **mlp)
        if use_basal_projection:
            self.basal_encoder: nn.Module = build_mlp(input_dim, hidden_dim, n_layers=n_encoder_layers, **mlp)
        else:
            self.basal_encoder = nn.Linear(input_dim, hidden_dim)

        backbone = build_backbone(backbone_key, backbone_kwargs)
        if lora and lora.get("enable", False):
            backbone = apply_lora(backbone, backbone_key, lora)
        self.transformer_backbone = backbone

        self.project_out = build_mlp(hidden_dim, output_dim, n_layers=n_decoder_layers, **mlp)
        self.register_module("final_down_then_up", None)
        if output_space == "all":
            bottleneck = max(output_dim // 8, 1)
            self.final_down_then_up = nn.Sequential(
                nn.Linear(output_dim, bottleneck), nn.GELU(), nn.Linear(bottleneck, output_dim)
            )

        # Registered in this order after project_out: the checkpoint's key order depends on it.
        self._add_batch_parts(batch_dim if use_batch_encoder else None, batch_dim if use_batch_token else None, mlp)
        self.register_module("confidence_token", None)
        if use_confidence_token:
            self.confidence_token = ConfidenceToken(hidden_dim, dropout=dropout)

        self.relu = nn.ReLU() if final_relu else None
        if freeze_backbone:
            self._freeze_backbone()

    def _add_batch_parts(self, encoder_batches: int | None, token_batches: int | None, mlp: dict) -> None:
        """The batch embedding added to every cell, and the batch token with its classifier (each only
        when asked for and the data have batches)."""
        hidden_dim = mlp["hidden_dim"]
        self.register_module("batch_encoder", None)
        if encoder_batches:
            self.batch_encoder = nn.Embedding(int(encoder_batches), hidden_dim)
        self.register_module("batch_classifier", None)
        self.register_parameter("batch_token", None)
        if token_batches:
            self.batch_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
            self.batch_classifier = build_mlp(hidden_dim, int(token_batches), n_layers=1, **mlp)

    def _freeze_backbone(self) -> None:
        """Freeze the backbone (its LoRA adapters still train) and the output projection."""
        for name, param in self.transformer_backbone.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(False)
        for param in self.project_out.parameters():
            param.requires_grad_(False)

    def forward(
        self,
        pert: torch.Tensor,
        basal: torch.Tensor,
        batch_index: torch.Tensor | None = None,
    ) -> TransitionOutput:
        n_cells = basal.shape[1]
        p = self.pert_encoder(pert)  # [B, S, H] (or [B, 1, H]: one perturbation per set)
        c = self.basal_encoder(basal)  # [B, S, H]
        x = p + c  # [B, S, H] (broadcast over the set when pert is [B, 1, P])
        if self.batch_encoder is not None and batch_index is not None:
            x = x + self.batch_encoder(batch_index.long())  # [B, S] -> [B, S, H]

        n_prefix = 0
        if self.batch_token is not None:
            x = prepend_token(x, self.batch_token)  # [B, 1 + S, H]
            n_prefix = 1
        if self.confidence_token is not None:
            x = self.confidence_token.append(x)  # [B, n_prefix + S + 1, H]

        mask = identity_attention_mask(x.shape[1], x.device) if self.mask_attn else None
        hidden = self.transformer_backbone(inputs_embeds=x, attention_mask=mask).last_hidden_state

        batch_logits = self.batch_classifier(hidden[:, 0]) if self.batch_token is not None else None  # [B, C]
        confidence = self.confidence_token.score(hidden[:, -1]) if self.confidence_token is not None else None
        r = hidden[:, n_prefix : n_prefix + n_cells]  # [B, S, H]

        if self.predict_residual and self.final_down_then_up is not None:
            # output_space "all": residual on the raw input features (input_dim == output_dim).
            y = self.final_down_then_up(self.project_out(r) + basal)  # [B, S, D_out]
        elif self.predict_residual:
            y = self.project_out(r + c)  # [B, S, D_out]
        else:
            y = self.project_out(r)  # [B, S, D_out]
        if self.relu is not None:
            y = self.relu(y)
        return TransitionOutput(preds=y, confidence=confidence, batch_logits=batch_logits)

