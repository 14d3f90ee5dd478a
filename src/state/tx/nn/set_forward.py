"""The batched forward of a State Transition net over B independent cell sets.

Shared by the LightningModule (:class:`state.tx.models.state_transition.StateTransitionPerturbationModel`)
and the Lightning-free inference model (:class:`state.tx.infer.net.TransitionInferenceModel`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def predict_sets(
    net: nn.Module, gene_decoder: nn.Module | None, *, ctrl, pert, batch=None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run B independent sets through ``net`` in one pass: ctrl [B,S,D_in], pert [B,S,P], batch [B,S].

    Returns numpy (preds [B, S, D_out], decoded counts [B, S, G] or None).
    """
    param = next(net.parameters())
    basal = torch.as_tensor(ctrl).to(param.device, param.dtype)
    pert_emb = torch.as_tensor(pert).to(param.device, param.dtype)
    if getattr(net, "set_level_perturbation", False) and bool((pert_emb == pert_emb[:, :1]).all()):
        # One perturbation per set (always so in infer): encode it once per set, not once per cell.
        pert_emb = pert_emb[:, :1]  # [B, 1, P], broadcast over the set inside the net
    batch_index = None
    if (net.batch_encoder is not None or net.batch_token is not None) and batch is not None:
        batch_index = torch.as_tensor(batch, device=param.device).long()  # [B, S]
    preds = net(pert_emb, basal, batch_index).preds  # [B, S, D_out]
    decoded = None if gene_decoder is None else gene_decoder(preds)
    counts = None if decoded is None else decoded.float().cpu().numpy()
    return preds.float().cpu().numpy(), counts
