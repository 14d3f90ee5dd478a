"""``StateEmbeddingModel``: the LightningModule that trains the SE network.

It wraps the plain :class:`~state.emb.nn.model.StateEmbeddingNet` (attribute ``net``) and owns the
loss, the metrics and the optimizer / LR schedule. Checkpoints keep arc-state's layout: the
state-dict keys have no ``net.`` prefix, ``hyper_parameters`` holds the constructor arguments
below, and the top level carries ``cfg_yaml`` and ``protein_embeds_dict``. Unlike arc-state, ``cfg``
is stored as a plain dict and ``collater`` as None, so our checkpoints load without running code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from state.emb.nn import SEArchitecture, StateEmbeddingNet, build_loss, dataset_loss, read_depth
from state.io.safe_load import placeholder_to_plain, safe_torch_load
from state.utils.errors import StateError
from state.utils.plain import resolved_config

log = logging.getLogger(__name__)

NET_PREFIX = "net."
GENE_TABLE_KEY = "pe_embedding.weight"


def plain_config(cfg: Any) -> dict:
    """A config as plain, resolved Python data (safe to pickle into checkpoints).

    Configs read back from arc-state checkpoints arrive as OmegaConf placeholders; they become data first.
    """
    return resolved_config(cfg if isinstance(cfg, DictConfig) else placeholder_to_plain(cfg))


class StateEmbeddingModel(L.LightningModule):
    """SE pretraining. Constructor arguments are arc-state's (they become ``hyper_parameters``)."""

    def __init__(
        self,
        token_dim: int,
        d_model: int,
        nhead: int,
        d_hid: int,
        nlayers: int,
        output_dim: int,
        dropout: float = 0.0,
        warmup_steps: int = 0,
        compiled: bool = False,
        max_lr: float = 4e-4,
        emb_cnt: int = 145469,
        emb_size: int = 5120,
        cfg: Any = None,
        collater: Any = None,
    ) -> None:
        super().__init__()
        # Plain data only in the hyper-parameters: save_hyperparameters() reads these locals.
        cfg = plain_config(cfg)
        collater = collater if collater is None or isinstance(collater, dict) else None
        self.save_hyperparameters()
        self.cfg = OmegaConf.create(cfg)
        model_cfg = self.cfg.get("model", {})
        self.arch = SEArchitecture(
            token_dim=token_dim,
            d_model=d_model,
            nhead=nhead,
            d_hid=d_hid,
            nlayers=nlayers,
            output_dim=output_dim,
            num_datasets=_num_datasets(self.cfg),
            counts=bool(model_cfg.get("counts", True)),
            rda=bool(model_cfg.get("rda", True)),
            dataset_correction=bool(model_cfg.get("dataset_correction", True)),
            dropout=dropout,
        )
        self.net = StateEmbeddingNet(self.arch)
        loss_cfg = self.cfg.get("loss", {})
        dataset_cfg = self.cfg.get("dataset", {})
        self.loss_name = str(loss_cfg.get("name", "tabular"))
        self.train_loss_fn = build_loss(
            self.loss_name,
            shared=int(dataset_cfg.get("S", 512)),
            downsample=int(model_cfg.get("num_downsample", 1) or 1),
            kernel=str(loss_cfg.get("kernel", "energy")),
            normalization=bool(loss_cfg.get("normalization", True)),
        )
        self.val_loss_fn = build_loss(
            self.loss_name,
            shared=int(dataset_cfg.get("S", 512)),
            downsample=1,
            kernel=str(loss_cfg.get("kernel", "energy")),
            normalization=bool(loss_cfg.get("normalization", True)),
        )
        # gene -> vector dict written into checkpoints as protein_embeds_dict (set by fit / loading).
        self.protein_embeds: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ gene table
    def set_gene_embeddings(self, gene_embeddings: Mapping[str, torch.Tensor]) -> None:
        """Attach the vocabulary (dict order = index) as the frozen token table."""
        self.protein_embeds = {str(k): torch.as_tensor(v).detach().cpu() for k, v in gene_embeddings.items()}
        self.net.set_gene_table(torch.stack(list(self.protein_embeds.values())).float())

    # ------------------------------------------------------------------ steps
    def forward(self, batch: tuple, training: bool = True) -> dict[str, torch.Tensor]:
        """Losses and statistics of one collated batch (no side effects: FLOPs counting calls it too)."""
        sentence_ids, task_ids, targets, _, filtered, _, _, sentence_counts, dataset_nums = batch
        out = self.net.encode_sentences(sentence_ids, sentence_counts)  # [B, L(+1), o]
        cell = F.normalize(out[:, 0], dim=1)  # [B, o]
        ds_token = out[:, -1] if self.arch.dataset_correction else None
        ds_emb = self.net.dataset_embedder(ds_token) if ds_token is not None else None
        depth = read_depth(targets.float()) if self.arch.rda else None  # [B]
        scores = self.net.decode_genes(cell, self.net.gene_embeddings(task_ids), depth, ds_emb)  # [B, G]
        loss_fn = self.train_loss_fn if training else self.val_loss_fn
        # targets keep their own precision: under bf16-mixed, casting them to the scores' dtype would
        # round the expression to 8 bits before a loss that works in float32 anyway.
        result = {"loss": loss_fn(scores, targets)}
        if ds_token is not None and dataset_nums is not None:
            result["dataset_loss"] = dataset_loss(self.net.dataset_logits(ds_token), dataset_nums)
        result["avg_nonzero_genes"] = (filtered > 0).sum(dim=1).float().mean()
        return result

    def _shared_step(self, batch: tuple, *, training: bool) -> dict[str, torch.Tensor]:
        result = self(batch, training)
        # Quirk kept from arc-state: every training *and* validation batch also steps the LR schedule
        # (on top of Lightning's per-optimizer-step call); the schedule length is doubled to match.
        scheduler = self.lr_schedulers() if self._trainer is not None else None
        if scheduler is not None:
            scheduler.step()
        return result

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        result = self._shared_step(batch, training=True)
        loss = result["loss"]
        size = batch[0].shape[0]
        if "dataset_loss" in result:
            loss = loss + result["dataset_loss"]
            self.log("trainer/dataset_loss", result["dataset_loss"], batch_size=size)
        self.log("trainer/train_loss", loss, prog_bar=True, batch_size=size)
        self.log("trainer/avg_nonzero_genes", result["avg_nonzero_genes"], batch_size=size)
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("trainer/learning_rate", optimizer.param_groups[0]["lr"], batch_size=size)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        result = self._shared_step(batch, training=False)
        size = batch[0].shape[0]
        self.log("validation/val_loss", result["loss"], prog_bar=True, sync_dist=True, batch_size=size)
        if "dataset_loss" in result:
            self.log("validation/dataset_loss", result["dataset_loss"], sync_dist=True, batch_size=size)
        self.log("validation/avg_nonzero_genes", result["avg_nonzero_genes"], sync_dist=True, batch_size=size)
        return result["loss"]

    def configure_optimizers(self) -> dict:
        opt_cfg = self.cfg.get("optimizer", {})
        max_lr = float(self.hparams.max_lr)
        # All parameters, the frozen gene table included, so optimizer states match arc-state's.
        optimizer = torch.optim.AdamW(self.parameters(), lr=max_lr, weight_decay=float(opt_cfg.get("weight_decay", 0.01)))
        total_steps = max(2 * int(self.trainer.estimated_stepping_batches), 1)
        # arc-state uses int(0.03 * total); at least 1 so that tiny runs do not stay at the start factor.
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer,
            start_factor=float(opt_cfg.get("start", 0.33)),
            end_factor=float(opt_cfg.get("end", 1.0)),
            total_iters=max(int(0.03 * total_steps), 1),
        )
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=0.3 * max_lr)
        scheduler = torch.optim.lr_scheduler.ChainedScheduler([warmup, cosine], optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {
            (k[len(NET_PREFIX) :] if k.startswith(NET_PREFIX) else k): v for k, v in checkpoint["state_dict"].items()
        }
        checkpoint["cfg_yaml"] = OmegaConf.to_yaml(self.cfg)
        if self.protein_embeds is not None:
            checkpoint["protein_embeds_dict"] = self.protein_embeds

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {(k if k.startswith(NET_PREFIX) else NET_PREFIX + k): v for k, v in state.items()}
        table = state.get(GENE_TABLE_KEY, state.get(NET_PREFIX + GENE_TABLE_KEY))
        if self.net.pe_embedding is None and table is not None:
            self.net.set_gene_table(table.float())
        embeds = checkpoint.get("protein_embeds_dict")
        if self.protein_embeds is None and isinstance(embeds, Mapping):
            self.protein_embeds = {str(k): torch.as_tensor(v) for k, v in embeds.items()}

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, cfg: Any = None, **hparam_overrides: Any) -> StateEmbeddingModel:
        """Load any SE checkpoint (ours or arc-state's) safely, through the restricted unpickler.

        ``hparam_overrides`` replace stored hyper-parameters (e.g. ``dropout=0.0`` for inference,
        since attention dropout is applied even in eval mode).
        """
        checkpoint = safe_torch_load(path, what="SE checkpoint")
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise StateError(f"{path} is not a Lightning checkpoint (no state_dict)", hint="pass a .ckpt file")
        hparams = placeholder_to_plain(checkpoint.get("hyper_parameters") or {})
        if cfg is None:
            cfg = checkpoint_config(checkpoint, hparams)
        names = ("token_dim", "d_model", "nhead", "d_hid", "nlayers", "output_dim", "dropout", "warmup_steps",
                 "compiled", "max_lr", "emb_cnt", "emb_size")
        missing = [n for n in names[:6] if n not in hparams]
        if missing:
            raise StateError(f"{path}: hyper_parameters lack {', '.join(missing)}", hint="not an SE checkpoint?")
        kwargs = {n: hparams[n] for n in names if n in hparams} | hparam_overrides
        model = cls(**kwargs, cfg=cfg, collater=None)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
        return model


def checkpoint_config(checkpoint: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict:
    """The training config stored in a checkpoint: ``cfg_yaml``, else ``hyper_parameters.cfg``."""
    text = checkpoint.get("cfg_yaml") or hparams.get("cfg_yaml")
    if isinstance(text, str):
        return plain_config(OmegaConf.create(text))
    return plain_config(hparams.get("cfg") or {})


def warmup_steps_for(cfg) -> int:
    """arc-state's (unused) warm-up hyper-parameter; recorded for checkpoint compatibility."""
    cells = float(cfg.dataset.get("num_cells", 0) or 0)
    return int(0.15 * math.floor(cells / max(int(cfg.model.batch_size), 1)))


def _num_datasets(cfg: DictConfig) -> int:
    dataset_cfg = cfg.get("dataset", {})
    current = dataset_cfg.get("current")
    profile = dataset_cfg.get(str(current), {}) if current is not None else {}
    value = profile.get("num_datasets") if hasattr(profile, "get") else None
    return int(value) if value is not None else 1
