"""``linear``: the baseline a user would try first, a linear model of pseudo-bulk responses.

In the spirit of Ahlmann-Eltze et al. (2025), who found additive and linear models of pseudo-bulk
expression changes as good as deep models, it predicts a perturbation's response in a context from
its response in the *other* training contexts, one line per gene and context::

    response(c, p)[g] = a[c, g] + s[c, g] * elsewhere(c, p)[g]

``elsewhere(c, p)`` is the perturbation's mean pseudo-bulk response in the training contexts other
than ``c`` (:class:`~state.tx.models.mean_response.MeanResponses`). The intercept ``a`` is the
context's shared shift (the additive part), the slope ``s`` its gain on each gene. Both are fit by
ridge regression on the context's training perturbations, shrunk towards ``a = 0, s = 1`` (which is
the ``perturb_mean`` prediction). The ridge (``model.kwargs.ridge``) is ``auto`` by default: chosen
per context by leave-one-perturbation-out cross-validation, with ``perturb_mean`` itself a candidate
(:mod:`state.tx.models.linear_fit`), so a context whose line would fit noise, or one never seen,
gets ``perturb_mean``. The choice and the CV error of every candidate go to the run log and the
checkpoint (``linear_ridge_cv``). Prediction per cell: its paired control + the predicted response
(zero for control cells). Like the mean baselines it fits in one pass, no gradient steps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from state.tx.combinations import settings_from_hparams
from state.tx.models.combination_base import (
    COMBO_CV_KEY,
    COMBO_LINES_KEY,
    apply_combination_lines,
    fit_lines,
    wrap,
)
from state.tx.models.linear_fit import (
    AUTO,
    choices_from_plain,
    format_choices,
    parse_ridge,
)
from state.tx.models.mean_baselines import _GroupSums, _MeanBaseline
from state.tx.models.mean_response import CHECKPOINT_KEY, MeanResponses

log = logging.getLogger(__name__)
CV_KEY = "linear_ridge_cv"  # checkpoint: {context: {n_perts, chosen, candidates, cv_error}}


class LinearPerturbationModel(_MeanBaseline):
    """Control cell + a per-context linear map of the perturbation's response elsewhere."""

    statistics_keys = (CHECKPOINT_KEY, "linear_context_lines", CV_KEY, COMBO_LINES_KEY, COMBO_CV_KEY)

    def __init__(self, *, ridge: float | str = AUTO, **kwargs: Any) -> None:
        ridge = parse_ridge(ridge, key="model.kwargs.ridge")  # before anything is built
        super().__init__(**kwargs)
        self.ridge = ridge
        self.add_hparams({"ridge": self.ridge})
        self.responses: MeanResponses | None = None
        self.lines: dict[str, np.ndarray] = {}
        self.ridge_cv: dict[str, Any] = {}
        self.combinations = settings_from_hparams(self._hparam_record)  # pert_combination=additive
        self.combo_lines: dict[str, np.ndarray] = {}  # lines of combinations on their additive base
        self.combo_cv: dict[str, Any] = {}

    def compute_statistics(self, sums: _GroupSums) -> dict[str, Any]:
        responses = wrap(MeanResponses.from_group_sums(sums, str(self.control_pert)), self.combinations)
        lines, choices, combo_lines, combo_choices = fit_lines(responses, self.ridge)
        log.info("%s", format_choices(choices, title=f"linear: ridge per context (model.kwargs.ridge={self.ridge})"))
        if combo_choices:
            log.info("%s", format_choices(combo_choices, title="linear: combinations on their additive base"))
        return {CHECKPOINT_KEY: responses.to_checkpoint(), "linear_context_lines": lines,
                CV_KEY: {ctx: c.to_plain() for ctx, c in choices.items()}, COMBO_LINES_KEY: combo_lines,
                COMBO_CV_KEY: {ctx: c.to_plain() for ctx, c in combo_choices.items()}}

    def set_statistics(self, stats: Mapping[str, Any]) -> None:
        if stats.get(CHECKPOINT_KEY) is not None:
            self.responses = wrap(MeanResponses.from_checkpoint(stats[CHECKPOINT_KEY]), self.combinations)
        if stats.get("linear_context_lines") is not None:
            self.lines = {str(k): np.asarray(v, dtype=np.float32) for k, v in stats["linear_context_lines"].items()}
        if stats.get(CV_KEY) is not None:
            self.ridge_cv = {ctx: c.to_plain() for ctx, c in choices_from_plain(stats[CV_KEY]).items()}
        if stats.get(COMBO_LINES_KEY) is not None:
            self.combo_lines = {str(k): np.asarray(v, dtype=np.float32) for k, v in stats[COMBO_LINES_KEY].items()}
            self.combo_cv = dict(stats.get(COMBO_CV_KEY) or {})
        self._fitted = self.responses is not None

    def statistics(self) -> dict[str, Any]:
        return {CHECKPOINT_KEY: None if self.responses is None else self.responses.to_checkpoint(),
                "linear_context_lines": dict(self.lines), CV_KEY: dict(self.ridge_cv),
                COMBO_LINES_KEY: dict(self.combo_lines), COMBO_CV_KEY: dict(self.combo_cv)}

    def describe_choices(self) -> str:
        """The ridge chosen per context and every candidate's CV error (for ``tx predict``)."""
        return format_choices(choices_from_plain(self.ridge_cv),
                              title=f"linear: ridge per context (model.kwargs.ridge={self.ridge})")

    def predicted_responses(self, contexts: list[str] | None, perts: list[str]) -> np.ndarray:
        """[N, D] predicted pseudo-bulk responses (no control added); control -> 0."""
        assert self.responses is not None
        x = self.responses.elsewhere_rows(contexts, perts)
        out = x.copy()
        for i, ctx in enumerate(contexts or [None] * len(perts)):
            line = self.lines.get(str(ctx)) if ctx is not None else None
            if line is not None:
                out[i] = line[0] + line[1] * x[i]
        apply_combination_lines(out, contexts, perts, self.responses, self.combo_lines)
        is_control = np.array([p == str(self.control_pert) for p in perts])
        out[is_control] = 0.0
        return out

    def forward(self, batch: Mapping[str, Any], padded: bool = True) -> torch.Tensor:
        self._require_fitted()
        basal = self._rows(batch, "ctrl_cell_emb")  # [N, D]
        perts = [str(p) for p in batch["pert_name"]]
        contexts = [str(c) for c in batch["cell_type"]] if batch.get("cell_type") is not None else None
        shift = torch.from_numpy(self.predicted_responses(contexts, perts)).to(basal)
        return basal + shift  # [N, D]
