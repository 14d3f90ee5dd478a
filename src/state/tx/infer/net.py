"""The State Transition network rebuilt from a checkpoint for inference, without Lightning.

``infer`` only needs the forward pass, so for the ``state`` model it builds the plain
:class:`~state.tx.nn.state_transition.StateTransitionNet` (+ gene decoder) from the checkpoint's
``hyper_parameters`` with the same mapping training uses (:func:`transition_net_kwargs`) and loads
the weights strictly. Importing Lightning (and torchmetrics behind it) took several seconds of every
``infer`` run. The other registered models still load through their LightningModule.

:func:`~state.tx.nn.state_transition.predict_sets` is the batched forward shared with the LightningModule.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from state.tx.nn.backbones import match_position_table
from state.tx.nn.decoders import build_gene_decoder, builds_gene_decoder, decoder_cfg_from_state_dict
from state.tx.nn.state_transition import (
    StateTransitionNet,
    adopt_net_parts,
    predict_sets,
    transition_net_kwargs,
)

log = logging.getLogger(__name__)


class TransitionInferenceModel(nn.Module):
    """A ``state`` checkpoint's network and gene decoder, in eval mode, with its hyper-parameters.

    The net's parts sit at the top level (as in the LightningModule), so the checkpoint's
    ``state_dict`` loads as is.
    """

    def __init__(
        self, net: StateTransitionNet, gene_decoder: nn.Module | None, hparams: Mapping[str, Any]
    ) -> None:
        super().__init__()
        adopt_net_parts(self, net)
        self.gene_decoder = gene_decoder
        self.hparams = dict(hparams)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def predict_sets(self, *, ctrl, pert, batch=None, pert_names=None):
        """See :func:`predict_sets` (``pert_names`` is accepted for interface parity and unused)."""
        return predict_sets(self.net, self.gene_decoder, ctrl=ctrl, pert=pert, batch=batch)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Mapping[str, Any], *, path: str | os.PathLike
    ) -> TransitionInferenceModel:
        from state.tx.checkpoint import checkpoint_hparams, load_weights

        hparams = checkpoint_hparams(checkpoint, path=path)
        state_dict = checkpoint["state_dict"]
        kwargs = transition_net_kwargs(hparams, has_gene_decoder=builds_gene_decoder(hparams))
        net = StateTransitionNet(**kwargs)
        match_position_table(net.transformer_backbone, state_dict, "transformer_backbone.")
        # The decoder's layout comes from its weights, as when the LightningModule loads a checkpoint.
        dropout = float((hparams.get("decoder_cfg") or {}).get("dropout") or 0.1)
        decoder_cfg = decoder_cfg_from_state_dict(state_dict, dropout=dropout)
        model = cls(net, None if decoder_cfg is None else build_gene_decoder(decoder_cfg), hparams)
        load_weights(model, state_dict, path=path)
        return model.eval()
