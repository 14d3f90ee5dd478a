"""``state_plus``: the State Transition model with a recipe that beats the free baselines.

The network, its sizes (``hidden_dim``, ``cell_set_len``, ``transformer_backbone_kwargs``) and the
distributional loss are ``model=state``'s; this subclass adds four opt-in parts, each a
``model.kwargs`` key (``model=state`` itself never sees them, so its configs, hyper-parameters and
checkpoints are unchanged):

* ``response_residual``: predictions are control cell + the perturbation's mean pseudo-bulk
  response in the *other* training contexts (what ``perturb_mean`` predicts, with the own context
  left out so training pairs look like held-out ones) + the network's output, whose last layer
  starts at zero: training starts from the baseline and the network learns what is specific to
  the context and the cell instead of re-learning every perturbation and the identity map. (When
  the input is not in the output space, e.g. embedding in, genes out, the control cell is not
  added: the network's output is the base.)
* ``response_features``: the same response is also an input of the perturbation encoder (next to
  the one-hot vector), so a perturbation held out of a context is described by what it does
  elsewhere; this is what lets the network generalise to it.
* ``residual_base``: ``elsewhere`` (the response above) or ``linear`` (the ``linear`` baseline's
  prediction of the response: a per-context intercept and gain applied to it), for both the
  residual and the feature.
* ``linear_ridge``: the ridge of that linear fit (``model=linear``'s ``ridge``): ``auto`` (default)
  chooses it per context by leave-one-perturbation-out CV with the plain response elsewhere as a
  candidate (:mod:`state.tx.models.linear_fit`); a number fixes it (larger shrinks the lines towards
  the plain response elsewhere). The choice is logged and kept in the checkpoint (``LINES_CV_KEY``).
* ``set_mean_weight``: an MSE between the predicted and true set means (pseudo-bulk) next to the
  energy distance, closer to the metrics, which compare pseudo-bulk changes.
* ``lr_schedule``: ``cosine`` (linear warm-up over ``warmup_fraction`` of ``training.max_steps``,
  then cosine decay to ``min_lr_fraction`` of ``lr``) or ``constant`` (``model=state``'s).
* ``gate`` (with ``response_residual``): the correction must earn its keep
  (:mod:`state.tx.models.correction_gate`). At every validation it is judged against the base on
  perturbations it never trained on (the TOML's ``val`` perturbations; in contexts without any, a
  ``gate_holdout_fraction`` share of the training perturbations, left out of the loss), a blend
  weight ``w`` (0 = base only) is chosen there, and the weights with the best judged error are the
  ones kept at the end of training (``final.ckpt``). Predictions are ``control + base + w *
  correction``; ``w = 0`` when the correction never beat the base, which is logged, recorded in
  the checkpoint (``GATE_KEY``) and reported by ``tx predict``.

The response table is computed from the training loader when training starts and travels in the
checkpoint (:mod:`state.tx.models.mean_response`), so ``predict`` and ``infer`` need nothing else.
Inference runs one set at a time through ``predict_step`` (it needs each cell's context).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from state.tx.combinations import settings_from_hparams
from state.tx.models import correction_gate as gate
from state.tx.models.combination_base import COMBO_LINES_KEY, apply_combination_lines, fit_lines, wrap
from state.tx.models.entries import MODEL_NAME_KEY
from state.tx.models.linear_fit import (
    AUTO,
    choices_from_plain,
    format_choices,
    parse_ridge,
)
from state.tx.models.mean_response import CHECKPOINT_KEY, MeanResponses
from state.tx.models.state_transition import StateTransitionPerturbationModel
from state.tx.nn.mlp import activation_class, build_mlp
from state.utils.errors import StateError

LINES_KEY = "state_plus_linear_lines"
LINES_CV_KEY = "state_plus_linear_ridge_cv"  # {context: {n_perts, chosen, candidates, cv_error}}
GATE_KEY = "state_plus_gate"  # {blend, source, chosen: decision, history: [decisions]}; absent: blend 1
MAX_HELD_OUT_GROUPS = 64  # one cached set each, kept on the host: bounds the memory the judge needs
log = logging.getLogger(__name__)
RECIPE_DEFAULTS = {"response_residual": True, "response_features": True, "residual_base": "linear",
                   "linear_ridge": AUTO, "set_mean_weight": 1.0,
                   "lr_schedule": "cosine", "warmup_fraction": 0.05, "min_lr_fraction": 0.1,
                   "gate": True, "gate_holdout_fraction": 0.1}


class StatePlusPerturbationModel(StateTransitionPerturbationModel):
    """``model=state`` + the opt-in recipe of the module docstring."""

    # Inference goes through predict_step (one set at a time) so that each cell's context is known.
    predict_sets = None  # type: ignore[assignment]

    def __init__(self, **kwargs: Any) -> None:
        recipe = {key: kwargs.pop(key, default) for key, default in RECIPE_DEFAULTS.items()}
        if recipe["lr_schedule"] not in ("cosine", "constant"):
            raise StateError(f"unknown model.kwargs.lr_schedule '{recipe['lr_schedule']}'",
                             hint="use cosine or constant")
        if recipe["residual_base"] not in ("elsewhere", "linear"):
            raise StateError(f"unknown model.kwargs.residual_base '{recipe['residual_base']}'",
                             hint="use elsewhere (perturb_mean-like) or linear (the linear baseline's response)")
        recipe["linear_ridge"] = parse_ridge(recipe["linear_ridge"], key="model.kwargs.linear_ridge")
        super().__init__(**kwargs)
        self.add_hparams(recipe)
        self.response_residual = bool(recipe["response_residual"])
        self.response_features = bool(recipe["response_features"])
        self.residual_base = str(recipe["residual_base"])
        self.lines: dict[str, Any] = {}  # residual_base=linear: {context: [2, D] intercept, gain}
        self.linear_ridge = recipe["linear_ridge"]  # a number or "auto"
        self.ridge_cv: dict[str, Any] = {}
        self.combinations = settings_from_hparams(self._hparam_record)  # pert_combination=additive
        self.combo_lines: dict[str, Any] = {}  # residual_base=linear: lines of combinations on their additive base
        self.set_mean_weight = float(recipe["set_mean_weight"])
        self.lr_schedule = str(recipe["lr_schedule"])
        self.warmup_fraction = float(recipe["warmup_fraction"])
        self.min_lr_fraction = float(recipe["min_lr_fraction"])
        self.gate = bool(recipe["gate"]) and self.response_residual
        self.gate_holdout_fraction = float(recipe["gate_holdout_fraction"])
        if not 0.0 <= self.gate_holdout_fraction < 1.0:
            raise StateError(f"model.kwargs.gate_holdout_fraction={recipe['gate_holdout_fraction']!r} is not a share",
                             hint="use a number in [0, 1), e.g. model.kwargs.gate_holdout_fraction=0.1")
        self.blend = 1.0  # weight of the correction at inference; set by the gate
        self.gate_record: dict[str, Any] | None = None
        self._judge = gate.Judge(control=str(self.control_pert), max_groups=MAX_HELD_OUT_GROUPS)
        self._last_split: tuple[torch.Tensor, torch.Tensor] | None = None
        self.responses: MeanResponses | None = None
        self._last_preds: torch.Tensor | None = None
        self._set_mean_term: torch.Tensor | None = None
        if self.response_features:
            self._widen_pert_encoder()
        # Expression outputs stay non-negative: the net's final ReLU, or a clamp after the residual.
        self._non_negative = self.net.relu is not None
        self._on_basal = self.response_residual and self.input_dim == self.output_dim
        if self._on_basal:
            self._start_as_the_mean_response()

    def _start_as_the_mean_response(self) -> None:
        """The net predicts a correction on top of (control cell + response elsewhere): no final ReLU
        on the correction, and its last layer starts at zero, so training starts from perturb_mean."""
        self.net.relu = None
        last = [m for m in self.net.project_out.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def _widen_pert_encoder(self) -> None:
        """The perturbation encoder reads [one-hot, response elsewhere] (same layout, wider input)."""
        hp = self._hparam_record
        encoder = build_mlp(self.pert_dim + self.output_dim, self.hidden_dim,
                            n_layers=int(hp.get("n_encoder_layers", 2)), hidden_dim=self.hidden_dim,
                            dropout=float(hp.get("dropout", 0.1)),
                            activation=activation_class(hp.get("activation", "gelu")))
        self.net.pert_encoder = encoder
        self.register_module("pert_encoder", encoder)  # same key and position as before

    # ------------------------------------------------------------------ responses
    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise StateError("state_plus computes pseudo-bulk responses from a data module; "
                             "fit it with trainer.fit(model, datamodule=...)")
        if self.responses is None:  # a resumed run keeps the table of its checkpoint
            self.responses = wrap(MeanResponses.from_datamodule(datamodule, str(self.control_pert)),
                                  self.combinations)
            if self.residual_base == "linear":
                self.lines, choices, self.combo_lines, _ = fit_lines(self.responses, self.linear_ridge)
                self.ridge_cv = {ctx: c.to_plain() for ctx, c in choices.items()}
                log.info("%s", format_choices(
                    choices, title=f"state_plus: linear base, ridge per context (linear_ridge={self.linear_ridge})"))
        if self.gate:
            self._judge.start(self, datamodule, self.cell_set_len)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[MODEL_NAME_KEY] = "state_plus"
        if self.responses is not None:
            checkpoint[CHECKPOINT_KEY] = self.responses.to_checkpoint()
        if self.lines:
            checkpoint[LINES_KEY] = dict(self.lines)
        if self.ridge_cv:
            checkpoint[LINES_CV_KEY] = dict(self.ridge_cv)
        if self.combo_lines:
            checkpoint[COMBO_LINES_KEY] = dict(self.combo_lines)
        if self.gate_record is not None:
            checkpoint[GATE_KEY] = dict(self.gate_record)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get(CHECKPOINT_KEY) is not None:
            self.responses = wrap(MeanResponses.from_checkpoint(checkpoint[CHECKPOINT_KEY]), self.combinations)
        self.lines = {str(k): v for k, v in (checkpoint.get(LINES_KEY) or {}).items()}
        self.combo_lines = {str(k): v for k, v in (checkpoint.get(COMBO_LINES_KEY) or {}).items()}
        self.ridge_cv = dict(checkpoint.get(LINES_CV_KEY) or {})
        self.gate_record = checkpoint.get(GATE_KEY)
        self.blend = float(self.gate_record["blend"]) if self.gate_record else 1.0

    def describe_choices(self) -> str:
        """What the data chose for this model: the linear base's ridges and the gate (for ``tx predict``)."""
        parts = []
        if self.ridge_cv:
            choices = choices_from_plain(self.ridge_cv)
            parts.append(format_choices(choices, title="state_plus: linear base, ridge per context"))
        if self.response_residual:
            parts.append(gate.describe(self.gate_record))
        return "\n".join(parts)

    def _response_rows(self, batch: Mapping[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        """Each cell's response elsewhere, [B, S, D_out]."""
        if self.responses is None:
            raise StateError("state_plus has no response table yet: train it or load its checkpoint")
        names = batch.get("pert_name")
        if names is None:
            raise StateError("state_plus needs perturbation names in the batch ('pert_name')")
        contexts = batch.get("cell_type")
        contexts = None if contexts is None else [str(c) for c in contexts]
        rows = self.responses.elsewhere_rows(contexts, [str(p) for p in names])
        if self.lines and contexts is not None:  # residual_base=linear: the linear baseline's response
            for i, ctx in enumerate(contexts):
                if ctx in self.lines and rows[i].any():
                    rows[i] = self.lines[ctx][0] + self.lines[ctx][1] * rows[i]
        apply_combination_lines(rows, contexts, [str(p) for p in names], self.responses, self.combo_lines)
        return torch.from_numpy(rows).to(self.device, self.dtype).reshape(*shape, -1)

    # ------------------------------------------------------------------ forward
    def run(self, batch: Mapping[str, Any], *, padded: bool = True):
        pert, basal, batch_index = self._sets(batch, padded=padded)
        response = self._response_rows(batch, tuple(pert.shape[:2])) \
            if (self.response_features or self.response_residual) else None
        if self.response_features:
            pert = torch.cat([pert, response], dim=-1)  # [B, S, P + D_out]
        out = self.net(pert, basal, batch_index)
        if self.response_residual:
            base = response + (basal if self._on_basal else 0.0)
            self._last_split = (out.preds, base)  # (correction, base): what the gate judges
            weight = 1.0 if self.training else self.blend  # the correction trains at full weight
            preds = base + weight * out.preds
            out.preds = preds.clamp_min(0.0) if self._non_negative else preds
        self._last_preds = out.preds
        return out

    # ------------------------------------------------------------------ losses
    def _losses(self, batch: Mapping[str, Any], *, padded: bool) -> dict[str, torch.Tensor]:
        losses = super()._losses(batch, padded=padded)
        if self.set_mean_weight > 0 and self._last_preds is not None:
            preds = self._last_preds  # [B, S, D]
            target = batch["pert_cell_emb"].reshape(preds.shape).to(preds.device)  # not rounded to bf16
            losses["set_mean"] = nn.functional.mse_loss(preds.float().mean(dim=1), target.float().mean(dim=1))
        self._set_mean_term = losses.get("set_mean")
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int, padded: bool = True) -> torch.Tensor | None:
        if padded and self._judge.held_out:
            batch = self._judge.keep_for_training(batch, self.cell_set_len)
            if batch is None:  # every set of this batch is held out for the gate: no step
                return None
        total = super().training_step(batch, batch_idx, padded=padded)
        term = self._set_mean_term  # set by _losses, which the parent's training_step just ran
        if term is not None:
            self.log("train/set_mean_loss", term, batch_size=int(self._last_preds.shape[0]))
            total = total + self.set_mean_weight * term
        return total

    # ------------------------------------------------------------------ the gate
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().validation_step(batch, batch_idx)
        if self.gate and self._judge.uses_val and not self.trainer.sanity_checking:
            self._judge.add(batch, *self._last_split)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._judge.reset_val()

    def on_validation_epoch_end(self) -> None:
        if self.gate and not self.trainer.sanity_checking:
            self._decide()

    def on_fit_end(self) -> None:
        if not self.gate:
            return
        if not self._judge.history or self._judge.history[-1].step != self.global_step:
            self._judge.reset_val()  # the last steps were never validated: judge them now
            if self._judge.uses_val:
                was_training = self.training
                self.eval()  # as Lightning's validation runs it: no dropout
                with torch.no_grad():
                    for batch in self.trainer.datamodule.val_dataloader():
                        batch = self.normalize_batch(self._to_device(batch))
                        self.run(batch, padded=True)
                        self._judge.add(batch, *self._last_split)
                self.train(was_training)
            self._decide()
        best = self._judge.best
        if self._judge.snapshot is not None and best is not self._judge.history[-1]:
            self.load_state_dict(self._judge.snapshot)
        self.blend = best.blend
        self.gate_record = self._judge.record(best)
        log.info("%s", gate.describe(self.gate_record))

    def _decide(self) -> None:
        """Judge the current weights on the held-out groups; remember them when they are the best yet."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for batch in self._judge.held_out_sets.values():
                batch = self._to_device(batch)
                self.run(batch, padded=False)
                self._judge.add(batch, *self._last_split)
        self.train(was_training)
        decision = self._judge.decide(self.global_step)
        if decision is self._judge.best:
            self._judge.snapshot = {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()}
        self.blend = decision.blend
        self.gate_record = self._judge.record(decision)
        log.info("state_plus gate at step %d: blend %.3f, held-out error %.4g (base alone %.4g) on %d groups",
                 decision.step, decision.blend, decision.cv_error, decision.base_error, decision.n_groups)

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        from state.utils.device import batch_to_device

        return batch_to_device(dict(batch), self.device)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        max_steps = int(self._hparam_record.get("max_steps") or 0)
        if self.lr_schedule == "constant" or max_steps <= 0:
            return optimizer
        warmup = max(1, int(self.warmup_fraction * max_steps))
        floor = self.min_lr_fraction

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
