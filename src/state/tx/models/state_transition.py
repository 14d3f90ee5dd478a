"""``StateTransitionPerturbationModel``: the State Transition (ST) LightningModule.

Construction (what ``state tx train`` does, like arc-state's ``get_lightning_module``)::

    StateTransitionPerturbationModel(
        **model.kwargs,            # cell_set_len, hidden_dim, loss, blur, transformer_backbone_*, lora, decoder_cfg, ...
        **training,                # lr, batch_size, max_steps, ... (only lr is used here)
        embed_key=..., output_space=..., gene_names=[...], batch_size=..., control_pert=...,
        input_dim=..., gene_dim=..., hvg_dim=..., output_dim=..., pert_dim=..., batch_dim=...,
        basal_mapping_strategy=...,
    )

Every keyword ends up in ``hyper_parameters`` (same keys as arc-state 0.11.1 for the same config,
``transformer_backbone_kwargs.n_positions`` set to ``cell_set_len + extra_tokens``). Loading:
:func:`state.tx.checkpoint.load_state_transition` (safe, no code execution), or Lightning's
``load_from_checkpoint`` for our own trusted files.

Batches are cell-load dicts: ``pert_emb`` [N, P], ``ctrl_cell_emb`` [N, D_in],
``pert_cell_emb`` [N, D_out] (targets), optional ``batch`` (one-hot [N, C] or ints [N]) and
``pert_cell_counts`` [N, G]. ``padded=True`` (training/validation) reshapes N = B * cell_set_len
into B sets; ``padded=False`` (test/predict/infer) treats the N cells as one set of any length.

Logged metrics: ``train_loss`` (main loss), ``decoder_loss``, ``train/sinkhorn_loss`` and
``train/energy_loss`` (loss=se), ``train/batch_token_loss``, ``train/confidence_loss``,
``train/actual_loss`` (the per-set loss the confidence head predicts), ``train/l1_regularization``,
``val_loss`` (main loss only; checkpoints are chosen on it), ``val/decoder_loss``,
``val/confidence_loss``, ``val/actual_loss``, ``test_loss``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from state.tx.config.architecture import TransitionConfig
from state.tx.models.base import PerturbationModel
from state.tx.nn.backbones import match_position_table
from state.tx.nn.losses import SetLoss
from state.tx.nn.set_forward import predict_sets
from state.tx.nn.state_transition import (
    StateTransitionNet,
    TransitionOutput,
    adopt_net_parts,
    transition_net_kwargs,
)
from state.utils.errors import StateError
from state.utils.plain import to_plain

log = logging.getLogger(__name__)


class StateTransitionPerturbationModel(PerturbationModel):
    """Set transformer predicting perturbed cell states from control cells (see module docstring)."""

    # The swappable network: variants (pseudobulk, old_neuralot) subclass the net, not this module.
    net_class: type[StateTransitionNet] = StateTransitionNet

    def __init__(
        self,
        *,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        pert_dim: int,
        batch_dim: int | None = None,
        basal_mapping_strategy: str = "random",
        predict_residual: bool = True,
        distributional_loss: str = "energy",
        transformer_backbone_key: str = "llama",
        transformer_backbone_kwargs: Mapping[str, Any] | None = None,
        output_space: str = "gene",
        decoder_cfg: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            output_dim=output_dim,
            pert_dim=pert_dim,
            batch_dim=batch_dim,
            output_space=output_space,
            decoder_cfg=decoder_cfg,
            **kwargs,
        )
        if kwargs.get("finetune_vci_decoder", False):
            raise StateError(
                "finetune_vci_decoder=true is not supported (arc-state loads an SE checkpoint from fixed paths)",
                hint="set model.kwargs.finetune_vci_decoder=false",
            )
        arch = TransitionConfig.from_hparams({
            **self._hparam_record,
            "transformer_backbone_key": transformer_backbone_key,
            "transformer_backbone_kwargs": to_plain(dict(transformer_backbone_kwargs or {})),
        })
        self.cell_set_len = arch.set_len
        self.extra_tokens = arch.extra_tokens
        backbone_kwargs = arch.backbone_hparams()
        self.add_hparams(
            {
                "basal_mapping_strategy": basal_mapping_strategy,
                "predict_residual": predict_residual,
                "distributional_loss": distributional_loss,
                "transformer_backbone_key": transformer_backbone_key,
                "transformer_backbone_kwargs": backbone_kwargs,
            }
        )
        self.basal_mapping_strategy = basal_mapping_strategy
        self.predict_residual = bool(predict_residual)
        self.transformer_backbone_key = transformer_backbone_key
        self.transformer_backbone_kwargs = backbone_kwargs

        net = self.net_class(
            **transition_net_kwargs(self._hparam_record, has_gene_decoder=self.gene_decoder is not None)
        )
        adopt_net_parts(self, net)
        self._set_up_losses(kwargs, distributional_loss)

    def _set_up_losses(self, kwargs: Mapping[str, Any], distributional_loss: str) -> None:
        """The set losses and the weights of the auxiliary terms, from model.kwargs (arc-state's defaults)."""
        loss_kind = str(kwargs.get("loss", "energy"))
        loss_options = {
            "distributional_loss": distributional_loss,
            "blur": float(kwargs.get("blur", 0.05)),
            "sinkhorn_weight": float(kwargs.get("sinkhorn_weight", 0.01)),
            "energy_weight": float(kwargs.get("energy_weight", 1.0)),
        }
        self.loss_fn = SetLoss(
            loss_kind,
            num_chunks=int(kwargs.get("mmd_num_chunks", 1) or 1),
            randomize_chunks=bool(kwargs.get("randomize_mmd_chunks", False)),
            **loss_options,
        )
        self.decoder_loss_fn = SetLoss(loss_kind, **loss_options)
        self.decoder_weight = float(kwargs.get("decoder_weight", 1.0))
        self.detach_decoder = bool(kwargs.get("detach_decoder", False))
        self.batch_token_weight = float(kwargs.get("batch_token_weight", 0.1))
        self.confidence_weight = float(kwargs.get("confidence_weight", 0.01))
        self.confidence_target_scale = float(kwargs.get("confidence_target_scale", 10.0))
        self.regularization = float(kwargs.get("regularization", 0.0) or 0.0)

    # ------------------------------------------------------------------ forward
    def _sets(self, batch: Mapping[str, Any], *, padded: bool) -> tuple[torch.Tensor, ...]:
        """Reshape flat [N, .] batch tensors into sets [B, S, .]."""
        pert = batch["pert_emb"]
        basal = batch["ctrl_cell_emb"]
        n_cells = pert.shape[0]
        if padded:
            if n_cells % self.cell_set_len:
                raise StateError(
                    f"a padded batch of {n_cells} cells is not a whole number of sets of cell_set_len="
                    f"{self.cell_set_len}",
                    hint="use padded=False for a single set of any length",
                )
            shape = (-1, self.cell_set_len)
        else:
            shape = (1, n_cells)
        pert = pert.reshape(*shape, pert.shape[-1]).to(self.device, self.dtype)  # [B, S, P]
        basal = basal.reshape(*shape, basal.shape[-1]).to(self.device, self.dtype)  # [B, S, D_in]
        batch_index = None
        if (self.batch_encoder is not None or self.batch_token is not None) and batch.get(
            "batch"
        ) is not None:
            batch_index = torch.as_tensor(batch["batch"], device=self.device)
            if batch_index.dim() == 2:  # one-hot [N, C] -> index [N]
                batch_index = batch_index.argmax(dim=-1)
            batch_index = batch_index.reshape(shape).long()  # [B, S]
        return pert, basal, batch_index

    def run(self, batch: Mapping[str, Any], *, padded: bool = True) -> TransitionOutput:
        """The full network output for a collated batch (preds [B, S, D_out])."""
        pert, basal, batch_index = self._sets(batch, padded=padded)
        return self.net(pert, basal, batch_index)

    def forward(self, batch: Mapping[str, Any], padded: bool = True) -> torch.Tensor:
        preds = self.run(batch, padded=padded).preds  # [B, S, D_out]
        return preds.reshape(-1, self.output_dim)  # [N, D_out]

    def predict_outputs(self, batch: Mapping[str, Any], *, padded: bool):
        out = self.run(batch, padded=padded)
        extra = {} if out.confidence is None else {"confidence_pred": out.confidence}
        return out.preds.reshape(-1, self.output_dim), extra

    def predict_sets(self, *, ctrl, pert, batch=None, pert_names=None):
        """Inference on B independent sets in ONE forward pass (used by ``state tx infer``).

        ``ctrl`` [B, S, D_in] and ``pert`` [B, S, P] (arrays or tensors), ``batch`` [B, S] batch
        indices or None. Cells attend only within their own set, so this equals B calls of
        ``predict_step(padded=False)`` without B times the per-call overhead. Returns numpy
        (preds [B, S, D_out], decoded counts [B, S, G] or None). ``pert_names`` is unused here.
        """
        if self.raw_counts.transforms_expression:
            ctrl = self.raw_counts.apply({"ctrl_cell_emb": torch.as_tensor(ctrl)})["ctrl_cell_emb"]
        return predict_sets(self.net, self.gene_decoder, ctrl=ctrl, pert=pert, batch=batch)

    # ------------------------------------------------------------------ losses
    def _losses(self, batch: Mapping[str, Any], *, padded: bool) -> dict[str, torch.Tensor]:
        """Every loss term of one batch (scalars); ``n_sets`` is the number of sets."""
        out = self.run(batch, padded=padded)
        preds = out.preds  # [B, S, D]
        n_sets, n_cells = preds.shape[:2]
        # Only the device: under bf16-mixed preds are bf16 and the loss casts both to float32 itself.
        target = batch["pert_cell_emb"].reshape(n_sets, n_cells, -1).to(preds.device)
        terms = self.loss_fn.components(preds, target)  # each [B]
        per_set = terms["total"]
        losses = {"main": per_set.nanmean(), "n_sets": torch.tensor(n_sets)}
        if "sinkhorn" in terms:
            losses["sinkhorn"] = terms["sinkhorn"].nanmean()
            losses["energy"] = terms["energy"].nanmean()

        if self.gene_decoder is not None and batch.get("pert_cell_counts") is not None:
            latent = preds
            if self.detach_decoder:
                # Train the decoder alone; now and then on true latents to anchor it.
                latent = target if (self.training and random.random() < 0.1) else preds.detach()
            decoded = self.gene_decoder(latent)  # [B, S, G]
            counts = batch["pert_cell_counts"].reshape(n_sets, n_cells, -1).to(decoded.device)
            losses["decoder"] = self.decoder_loss_fn(decoded, counts).mean()

        if out.batch_logits is not None and batch.get("batch") is not None:
            _, _, batch_index = self._sets(batch, padded=padded)
            logits = out.batch_logits.unsqueeze(1).expand(-1, n_cells, -1)  # [B, S, C]
            losses["batch_token"] = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch_index.reshape(-1)
            )

        if out.confidence is not None:
            actual = per_set.detach().unsqueeze(-1) * self.confidence_target_scale  # [B, 1]
            losses["confidence"] = nn.functional.mse_loss(out.confidence, actual)
            losses["actual"] = per_set.detach().nanmean()

        if self.regularization > 0 and preds.shape[-1] == self.input_dim:
            basal = batch["ctrl_cell_emb"].reshape(n_sets, n_cells, -1).to(preds.device)
            losses["l1"] = (preds - basal).abs().mean()
        return losses

    def _log_terms(self, losses: dict[str, torch.Tensor], names: Mapping[str, str], **options: Any) -> None:
        n_sets = int(losses["n_sets"])
        for term, metric in names.items():
            if term in losses:
                self.log(metric, losses[term], batch_size=n_sets, **options)

    def training_step(self, batch: dict[str, Any], batch_idx: int, padded: bool = True) -> torch.Tensor:
        # padded=False: one set of any length (predict's test-time fine-tuning)
        losses = self._losses(batch, padded=padded)
        self._log_terms(losses, {"main": "train_loss"}, prog_bar=True)
        self._log_terms(
            losses,
            {
                "sinkhorn": "train/sinkhorn_loss",
                "energy": "train/energy_loss",
                "decoder": "decoder_loss",
                "batch_token": "train/batch_token_loss",
                "confidence": "train/confidence_loss",
                "actual": "train/actual_loss",
                "l1": "train/l1_regularization",
            },
        )
        total = losses["main"]
        if "decoder" in losses:
            total = total + self.decoder_weight * losses["decoder"]
        if "batch_token" in losses:
            total = total + self.batch_token_weight * losses["batch_token"]
        if "confidence" in losses:
            total = total + self.confidence_weight * losses["confidence"]
        if "l1" in losses:
            total = total + self.regularization * losses["l1"]
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch, padded=True)
        # val_loss is the main loss only (no decoder term): checkpoints are chosen on it.
        # sync_dist: each rank validates its share of the sets; the epoch's value is the mean over all of them
        # (Lightning sums value x sets and sets over the ranks, once per epoch).
        self._log_terms(losses, {"main": "val_loss"}, prog_bar=True, sync_dist=True)
        self._log_terms(
            losses,
            {"decoder": "val/decoder_loss", "confidence": "val/confidence_loss", "actual": "val/actual_loss"},
            sync_dist=True,
        )
        return losses["main"]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch, padded=False)
        self._log_terms(losses, {"main": "test_loss"}, sync_dist=True)
        return losses["main"]

    # ------------------------------------------------------------------ loading
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        match_position_table(
            self.transformer_backbone, checkpoint.get("state_dict", {}), "transformer_backbone."
        )
