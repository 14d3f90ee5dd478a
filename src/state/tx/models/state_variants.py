"""``pseudobulk`` and ``old_neuralot``: the State Transition module with a different network.

Everything else (hyper-parameters, set losses, decoder loss, logging, loading) is
:class:`StateTransitionPerturbationModel`'s; each variant only swaps ``net_class`` (see
:mod:`state.tx.nn.state_variants`) and adjusts two defaults:

* pseudobulk: the gene decoder's loss weighs 0.1 (``decoder_weight``), and the final ReLU is applied
  only when ``softplus`` is set and the outputs are expression (``output_space=gene``, no gene decoder
  or ``embed_key`` X_hvg/None).
* old_neuralot: as the state model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from state.tx.models.state_transition import StateTransitionPerturbationModel
from state.tx.models.zoo_common import NamedCheckpointMixin
from state.tx.nn.state_variants import PerCellTokenNet, PseudobulkNet


class PseudobulkPerturbationModel(NamedCheckpointMixin, StateTransitionPerturbationModel):
    zoo_name = "pseudobulk"
    net_class = PseudobulkNet

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("decoder_weight", 0.1)
        super().__init__(**kwargs)
        expression_out = self.output_space == "gene" and self.relu is not None
        keep_relu = bool(kwargs.get("softplus", False)) and expression_out
        relu = nn.ReLU() if keep_relu else None
        self.net.relu = relu
        self.relu = relu


class OldNeuralOTPerturbationModel(NamedCheckpointMixin, StateTransitionPerturbationModel):
    zoo_name = "old_neuralot"
    net_class = PerCellTokenNet
