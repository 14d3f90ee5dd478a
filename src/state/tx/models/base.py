"""Shared LightningModule base for every tx model (State Transition and the baselines).

Constructor contract (mirrors how arc-state's ``train`` builds a model): one
flat keyword dict made of ``model.kwargs`` + the whole ``training`` dict + ``embed_key``,
``output_space``, ``gene_names``, ``batch_size``, ``control_pert`` and the dims ``input_dim,
gene_dim, hvg_dim, output_dim, pert_dim, batch_dim`` (+ ``decoder_cfg`` inside model.kwargs).
Unknown keys are kept (they end up in ``hyper_parameters`` exactly as in arc-state) and ignored.

Hyper-parameters: ``hyper_parameters`` in a checkpoint is the union, in this order, of the base
arguments below (with their defaults), every extra keyword given, and the subclass's own named
arguments (added with :meth:`PerturbationModel.add_hparams`). That is the key set arc-state writes
for the same config. Values are stored as plain Python types (numpy scalars/strings and OmegaConf
containers are converted), so our checkpoints load with ``torch.load(weights_only=True)``.

Subclass contract:
* implement ``forward(batch, padded=True) -> Tensor [N, output_dim]`` (the latent prediction);
* optionally override ``extra_prediction_outputs(batch, padded)`` to add keys to predict_step;
* ``predict_step(batch, batch_idx, padded=True)`` returns arc-state's output dict (``preds``, ``pert_cell_emb``,
  ``pert_cell_counts``, ``pert_name``, ``celltype_name``, ``batch``, ``ctrl_cell_emb``, the two
  barcodes, and the decoded ``pert_cell_counts_preds`` when a gene decoder exists);
* the optimizer is one ``Adam(self.parameters(), lr)`` over ALL parameters in registration order
  (frozen ones included), so arc-state optimizer states line up when resuming (``AdamW`` with
  ``training.optimizer=adamw``, same state layout).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

from state.tx.models.raw_counts import ENABLE_KEY, TARGET_KEY, RawCounts
from state.tx.nn.decoders import build_gene_decoder, builds_gene_decoder, decoder_cfg_from_state_dict
from state.utils.plain import to_plain

log = logging.getLogger(__name__)

OUTPUT_SPACES = ("embedding", "gene", "all")


def adam(params: Any, *, lr: float, fused: bool = True, weight_decay: float = 0.0) -> torch.optim.Adam:
    """``torch.optim.Adam`` (arc-state's optimizer and defaults), with ``fused``, using PyTorch's fused
    update kernel when every parameter is a float tensor on CPU or CUDA: the same update rule in one
    kernel per step instead of a loop over tensors (~3x faster per step for a small model on CPU).
    Without it, CUDA parameters take the multi-tensor (``foreach``) update. The state dict has the
    same layout, so checkpoints resume either way.

    ``weight_decay`` > 0 gives ``AdamW`` (decoupled decay; ``training.optimizer=adamw``) instead."""
    params = list(params)
    supported = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    fused = fused and bool(params) and supported
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    foreach = True if on_cuda and not fused else None
    if weight_decay > 0:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None, foreach=foreach)
    return torch.optim.Adam(params, lr=lr, fused=fused or None, foreach=foreach)


def _check_output_space(output_space: str) -> None:
    if output_space not in OUTPUT_SPACES:
        from state.utils.errors import StateError

        raise StateError(
            f"output_space must be one of {', '.join(OUTPUT_SPACES)}, got '{output_space}'",
            hint="set data.kwargs.output_space",
        )


class PerturbationModel(LightningModule):
    """Base LightningModule: hyper-parameter capture, the gene decoder, Adam, predict_step."""

    # Whether configure_optimizers follows ``training.optimizer`` (False: the model has its own
    # optimizer settings, e.g. ``training.wd`` of the CPA / scVI / scGPT training files).
    honours_optimizer_choice = True
    # AdamW's decoupled weight decay, set by `tx train` for training.optimizer=adamw. Not a
    # hyper-parameter: it only shapes the optimizer, and arc-state's checkpoints carry no such key.
    decoupled_weight_decay = 0.0

    def __init__(
        self,
        *,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        pert_dim: int,
        batch_dim: int | None = None,
        dropout: float = 0.1,
        lr: float = 3e-4,
        loss_fn: Any = "mse",
        control_pert: str = "non-targeting",
        embed_key: str | None = None,
        output_space: str = "gene",
        gene_names: list[str] | None = None,
        batch_size: int = 64,
        gene_dim: int = 5000,
        hvg_dim: int = 2001,
        decoder_cfg: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_output_space(output_space)
        if output_space == "embedding":
            # No expression target exists in embedding space: never build or save a decoder.
            kwargs["gene_decoder_bool"] = False
            decoder_cfg = None
        base = {
            "input_dim": input_dim,
            "hidden_dim": hidden_dim,
            "output_dim": output_dim,
            "pert_dim": pert_dim,
            "batch_dim": batch_dim,
            "dropout": dropout,
            "lr": lr,
            "loss_fn": loss_fn if isinstance(loss_fn, str | None) else type(loss_fn).__name__,
            "control_pert": control_pert,
            "embed_key": embed_key,
            "output_space": output_space,
            "gene_names": gene_names,
            "batch_size": batch_size,
            "gene_dim": gene_dim,
            "hvg_dim": hvg_dim,
            "decoder_cfg": decoder_cfg,
        }
        self._hparam_record: dict[str, Any] = {}
        self.add_hparams(base)
        self.add_hparams(kwargs)
        self._keep_base_arguments(base)
        self.gene_decoder_bool = bool(kwargs.get("gene_decoder_bool", True))
        self.raw_counts = RawCounts.from_kwargs(kwargs, embed_key=embed_key)
        if self.raw_counts.enabled:  # the keys arc-state main's checkpoints carry
            self.add_hparams({ENABLE_KEY: True, TARGET_KEY: self.raw_counts.target_sum})
        # Registered (as None) up front so the decoder keeps arc-state's first position in the
        # parameter order even when on_load_checkpoint adds it later.
        self.register_module("gene_decoder", None)
        if builds_gene_decoder(self._hparam_record):
            self.gene_decoder = build_gene_decoder(self.decoder_cfg)

    def _keep_base_arguments(self, base: Mapping[str, Any]) -> None:
        """The base arguments as typed attributes (``self.input_dim``, ``self.lr``, ...)."""
        self.input_dim = int(base["input_dim"])
        self.hidden_dim = int(base["hidden_dim"])
        self.output_dim = int(base["output_dim"])
        self.pert_dim = int(base["pert_dim"])
        self.batch_dim = None if base["batch_dim"] is None else int(base["batch_dim"])
        self.dropout = float(base["dropout"])
        self.lr = float(base["lr"])
        self.control_pert = base["control_pert"]
        self.embed_key = base["embed_key"]
        self.output_space = base["output_space"]
        self.gene_names = to_plain(base["gene_names"])
        self.batch_size = base["batch_size"]
        self.gene_dim = int(base["gene_dim"]) if base["gene_dim"] is not None else None
        self.hvg_dim = int(base["hvg_dim"]) if base["hvg_dim"] is not None else None
        self.decoder_cfg = to_plain(base["decoder_cfg"])

    # ----------------------------------------------------------------- hyper-parameters
    def add_hparams(self, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into ``hyper_parameters`` (later values win, first position kept)."""
        self._hparam_record.update(to_plain(dict(values)))
        self.save_hyperparameters(dict(self._hparam_record))
        # Lightning's own name for hparams captured from **kwargs; arc-state checkpoints carry it
        # and load_from_checkpoint then passes hyper_parameters as keyword arguments.
        self._hparams_name = "kwargs"

    # ----------------------------------------------------------------- raw counts (opt-in)
    def normalize_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """log1p(CP) of the count tensors when ``log1p_from_raw_counts`` is on; else ``batch`` itself."""
        return self.raw_counts.apply(batch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # every train / validation / test step Lightning runs; predict_step normalizes itself
        trainer = self._trainer
        if isinstance(batch, Mapping) and not (trainer is not None and trainer.predicting):
            return self.normalize_batch(batch)
        return batch

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam(self.parameters(), lr=self.lr, fused=not self._scaler_must_unscale(),
                    weight_decay=self.decoupled_weight_decay)

    def _scaler_must_unscale(self) -> bool:
        """16-mixed with clipping: the GradScaler has to unscale the gradients before they are clipped,
        which a fused step (it unscales inside) does not allow. bf16-mixed has no scaler."""
        trainer = self._trainer
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        return scaler is not None and bool(getattr(trainer, "gradient_clip_val", 0))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        plugin = self.trainer.precision_plugin
        if (gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None
                and getattr(optimizer, "_step_supports_amp_scaling", False)):
            # Lightning refuses to clip for a fused optimizer under any mixed precision, a rule meant for
            # 16-mixed's GradScaler; under bf16-mixed the gradients are true gradients: clip them as in 32-true.
            algorithm = GradClipAlgorithmType((gradient_clip_algorithm or "norm").lower())
            Precision.clip_gradients(plugin, optimizer, float(gradient_clip_val), algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------- helpers
    def decode(self, preds: torch.Tensor) -> torch.Tensor | None:
        """Gene-space counts from latent predictions, or None when there is no decoder."""
        return None if self.gene_decoder is None else self.gene_decoder(preds)

    def training_step(self, batch: dict[str, Any], batch_idx: int, padded: bool = True) -> torch.Tensor:
        """Default objective for simple baselines: MSE on ``pert_cell_emb`` (+ decoder MSE)."""
        preds = self(batch, padded=padded)
        loss = nn.functional.mse_loss(preds, batch["pert_cell_emb"])
        self.log("train_loss", loss, prog_bar=True)
        if self.gene_decoder is not None and "pert_cell_counts" in batch:
            decoded = self.gene_decoder(preds.detach())
            decoder_loss = nn.functional.mse_loss(decoded, batch["pert_cell_counts"])
            self.log("decoder_loss", decoder_loss)
            loss = loss + decoder_loss
        return loss

    def predict_outputs(self, batch: dict[str, Any], *, padded: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """Subclass hook: latent predictions [N, output_dim] and extra predict_step keys."""
        return self(batch, padded=padded), {}

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0, padded: bool = True, **_: Any):
        """Run the model on one collated batch and return arc-state's predict_step dict.

        ``padded=True``: the batch holds B full sets of ``cell_set_len`` cells (training layout);
        ``padded=False``: the batch is ONE set of any length (predict / infer).
        """
        batch = self.normalize_batch(batch)
        preds, extra = self.predict_outputs(batch, padded=padded)
        out: dict[str, Any] = {
            "preds": preds,
            "pert_cell_emb": batch.get("pert_cell_emb"),
            "pert_cell_counts": batch.get("pert_cell_counts"),
            "pert_name": batch.get("pert_name"),
            "celltype_name": batch.get("cell_type"),
            "batch": batch.get("batch"),
            "ctrl_cell_emb": batch.get("ctrl_cell_emb"),
            "pert_cell_barcode": batch.get("pert_cell_barcode"),
            "ctrl_cell_barcode": batch.get("ctrl_cell_barcode"),
        }
        out.update(extra)
        decoded = self.decode(preds)
        if decoded is not None:
            out["pert_cell_counts_preds"] = decoded
        return out

    # ----------------------------------------------------------------- loading
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make ``gene_decoder`` match the checkpoint's weights before they are loaded.

        The layout is read from the weights themselves (arc-state instead guesses widths when a
        checkpoint lacks ``decoder_cfg``); the saved ``decoder_cfg`` only contributes the dropout.
        """
        hparams = checkpoint.get("hyper_parameters") or {}
        saved_cfg = hparams.get("decoder_cfg") if isinstance(hparams, Mapping) else None
        dropout = float((saved_cfg or {}).get("dropout") or 0.1)
        wanted = decoder_cfg_from_state_dict(checkpoint.get("state_dict", {}), dropout=dropout)
        if wanted is None:
            if self.gene_decoder is not None:
                log.info("checkpoint has no gene_decoder weights; dropping the decoder")
            self.gene_decoder = None
            return
        if self.gene_decoder is not None:
            current = decoder_cfg_from_state_dict(self.gene_decoder.state_dict(), prefix="", dropout=dropout)
            if current == wanted:
                return
        if not saved_cfg:
            log.info("checkpoint has no decoder_cfg; decoder layout taken from its weights: %s", wanted)
        self.decoder_cfg = wanted
        self.gene_decoder = build_gene_decoder(wanted).to(next(self.parameters()).device)
