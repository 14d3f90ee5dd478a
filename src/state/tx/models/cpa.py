"""``CPA`` baseline (model=cpa): the scVI-style autoencoder plus adversaries, with its own schedule.

The autoencoder is the one of :class:`state.tx.models.scvi.ScVIPerturbationModel` (CPA defaults:
deterministic latent, Gaussian likelihood). The swappable part is the adversarial training: MLP
classifiers try to recover the perturbation (and the batch) from the basal latent ``z_basal``;
the autoencoder is trained to fool them, so ``z_basal`` carries no perturbation information and
adding another perturbation's embedding gives a counterfactual cell.

Schedule (manual optimisation, one optimiser step per training batch, so ``max_steps`` counts
batches); counted in training steps ``t``, keys from training/cpa.yaml:

* ``t < n_steps_pretrain_ae``: autoencoder only (reconstruction + KL when variational);
* afterwards, per cycle of ``adv_steps + 1`` batches (``adv_steps`` null -> 1): ``adv_steps``
  adversary updates (cross-entropy + ``pen_adv`` x gradient penalty on its inputs), then one
  autoencoder update with loss ``recon - w(t) * adversary cross-entropy`` where ``w`` ramps
  linearly from 0 to ``reg_adv`` over ``n_steps_adv_warmup`` steps.

Two optimisers: Adam(lr, wd) for everything but the adversaries, Adam(adv_lr, adv_wd) for the
adversaries, each with StepLR every ``step_size_lr`` epochs. ``do_clip_grad`` clips both at
``gradient_clip_val`` (the Trainer does not clip: it cannot under manual optimisation).
Logged: the scVI terms plus ``train/adv_loss``, ``train/adv_penalty``, ``train/adv_weight``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from state.tx.models.scvi import ScVIPerturbationModel
from state.tx.models.zoo_common import adam_with_step_lr, batch_indices, flat_rows
from state.tx.nn.perturbation_autoencoder import make_classifier
from state.utils.errors import StateError

log = logging.getLogger(__name__)

ADV_LOSSES = ("cce",)


class CPAPerturbationModel(ScVIPerturbationModel):
    """Compositional perturbation autoencoder (see module docstring)."""

    zoo_name = "cpa"
    settings_defaults: ClassVar[dict[str, Any]] = {
        **ScVIPerturbationModel.settings_defaults,
        "recon_loss": "gauss",
        "n_hidden_encoder": 1024,
        "n_layers_encoder": 5,
        "n_hidden_decoder": 1024,
        "n_layers_decoder": 4,
        "use_batch_norm": "decoder",
        "use_layer_norm": "encoder",
        "dropout_rate_encoder": 0.2,
        "dropout_rate_decoder": 0.2,
        "variational": False,
        "n_hidden_adv": 128,
        "n_layers_adv": 3,
        "use_norm_adv": "batch",
        "dropout_rate_adv": 0.25,
        "n_steps_adv_warmup": 50000,
        "n_steps_pretrain_ae": 50000,
        "adv_steps": None,
        "reg_adv": 15.0,
        "pen_adv": 20.0,
        "adv_lr": 5e-4,
        "adv_wd": 4e-7,
        "adv_loss": "cce",
        "do_clip_grad": False,
        "gradient_clip_val": 10.0,
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        s = self.settings
        if str(s["adv_loss"]).lower() not in ADV_LOSSES:
            raise StateError(f"training.adv_loss={s['adv_loss']!r} is not supported",
                             hint=f"use one of: {', '.join(ADV_LOSSES)}")
        adversary = {"hidden_dim": int(s["n_hidden_adv"]), "n_layers": int(s["n_layers_adv"]),
                     "norm": str(s["use_norm_adv"]).lower(), "dropout": float(s["dropout_rate_adv"])}
        n_latent = int(s["n_latent"])
        self.pert_adversary = make_classifier(n_latent, self.pert_dim, **adversary)
        self.batch_adversary = (
            make_classifier(n_latent, self.batch_dim, **adversary) if self.batch_dim and self.batch_dim > 1 else None
        )

    # ------------------------------------------------------------------ adversaries
    def _adversary_targets(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        pert = flat_rows(batch, "pert_emb", like=self)
        targets = {"pert": pert.argmax(dim=-1)}  # one-hot perturbations -> class index
        index = batch_indices(batch, device=pert.device, n_classes=self.batch_dim)
        if self.batch_adversary is not None and index is not None:
            targets["batch"] = index
        return targets

    def _adversary_ce(self, z_basal: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy of the adversaries and the logits summed over classes (for the penalty)."""
        heads = {"pert": self.pert_adversary, "batch": self.batch_adversary}
        ce = z_basal.new_zeros(())
        logit_sum = z_basal.new_zeros(())
        for name, target in targets.items():
            logits = heads[name](z_basal)
            ce = ce + F.cross_entropy(logits, target)
            logit_sum = logit_sum + logits.sum()
        return ce, logit_sum

    def adversary_weight(self, step: int) -> float:
        warmup = int(self.settings["n_steps_adv_warmup"] or 0)
        since = step - int(self.settings["n_steps_pretrain_ae"] or 0)
        return float(self.settings["reg_adv"]) * (1.0 if warmup <= 0 else min(1.0, max(since, 0) / warmup))

    def is_adversary_turn(self, step: int) -> bool:
        pretrain = int(self.settings["n_steps_pretrain_ae"] or 0)
        if step < pretrain:
            return False
        adv_steps = int(self.settings["adv_steps"] or 1)
        return (step - pretrain) % (adv_steps + 1) < adv_steps

    # ------------------------------------------------------------------ optimisation
    def _step(self, optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.settings["do_clip_grad"]:
            self.clip_gradients(optimizer, gradient_clip_val=float(self.settings["gradient_clip_val"]),
                                gradient_clip_algorithm="norm")
        optimizer.step()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opt_ae, opt_adv = self.optimizers()
        step = int(self.global_step)
        n_cells = len(batch["pert_name"])
        terms = self.reconstruction_terms(batch)
        self.log_reconstruction(terms, n_cells=n_cells)
        targets = self._adversary_targets(batch)
        if self.is_adversary_turn(step):
            z = terms["out"].z_basal.detach().requires_grad_(True)
            ce, logit_sum = self._adversary_ce(z, targets)
            (grad,) = torch.autograd.grad(logit_sum, z, create_graph=True)
            penalty = grad.pow(2).sum(-1).mean()
            loss = ce + float(self.settings["pen_adv"]) * penalty
            self._step(opt_adv, loss)
            self.log("train/adv_loss", ce, batch_size=n_cells)
            self.log("train/adv_penalty", penalty, batch_size=n_cells)
            return loss.detach()
        loss = terms["total"] + terms.get("decoder", 0.0)
        if step >= int(self.settings["n_steps_pretrain_ae"] or 0):
            weight = self.adversary_weight(step)
            ce, _ = self._adversary_ce(terms["out"].z_basal, targets)
            loss = loss - weight * ce
            self.log("train/adv_weight", weight, batch_size=n_cells)
        self._step(opt_ae, loss)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    def configure_optimizers(self):
        adversaries = [m for m in (self.pert_adversary, self.batch_adversary) if m is not None]
        adversary_ids = {id(p) for m in adversaries for p in m.parameters()}
        s = self.settings
        opt_ae, sched_ae = adam_with_step_lr(
            (p for p in self.parameters() if id(p) not in adversary_ids), lr=self.lr, weight_decay=s["wd"],
            step_size=s["step_size_lr"])
        opt_adv, sched_adv = adam_with_step_lr(
            (p for m in adversaries for p in m.parameters()), lr=s["adv_lr"], weight_decay=s["adv_wd"],
            step_size=s["step_size_lr"])
        schedulers = [s for s in (sched_ae, sched_adv) if s is not None]
        return [opt_ae, opt_adv], schedulers
