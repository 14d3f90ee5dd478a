"""The ``linear`` baseline's per-context lines and how strongly they are shrunk (pure numpy).

For a context ``c`` with training perturbations ``p_1..p_n`` and per gene ``g``::

    response(c, p)[g] = a[g] + s[g] * elsewhere(c, p)[g]

fit by ridge towards ``a = 0, s = 1`` (the ``perturb_mean`` prediction, "no line at all"):
penalties ``ridge * n`` on ``a`` and ``ridge * mean_g(sum_p x^2)`` on ``s - 1``.

The ridge is a *choice*, and a fixed one loses on data it was not tuned on (with 12 training
perturbations and 1,000 genes a ridge of 0.1 fits noise). :func:`cross_validate_context` therefore
scores every candidate of :data:`RIDGE_GRID` plus ``perturb_mean`` itself by leave-one-perturbation-
out error on the context's own training perturbations. For a linear smoother the leave-one-out
residual is closed-form, ``(r_i - r_hat_i) / (1 - h_ii)`` with ``h_ii`` the hat-matrix diagonal, so
the whole grid costs a few vectorised passes. ``perturb_mean`` does not depend on the held-out
perturbation, so its error is its plain error. The simplest candidate within one standard error
of the lowest error wins (:func:`cross_validate_context`); a context whose CV prefers
``perturb_mean`` (or has fewer than :data:`MIN_PERTS_FOR_LINE` training perturbations) gets
``perturb_mean``: line ``(0, 1)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from state.utils.errors import StateError

log = logging.getLogger(__name__)

AUTO = "auto"
RIDGE_GRID = tuple(float(v) for v in np.logspace(-3, 3, 13))  # 0.001 ... 1000, half a decade apart
PERTURB_MEAN = "perturb_mean"  # the "no line" candidate's label
MIN_PERTS_FOR_LINE = 3  # below this, leave-one-out leaves too little to fit a line from


def parse_ridge(value: Any, *, key: str) -> float | str:
    """``auto`` or a non-negative number; anything else is one clear line naming the override ``key``."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        ridge = float(value)
    except (TypeError, ValueError):
        ridge = math.nan
    if isinstance(value, bool) or not math.isfinite(ridge) or ridge < 0:
        raise StateError(f"{key}={value!r} is not a ridge",
                         hint=f"use {key}=auto (chosen per context by cross-validation, the default) "
                              f"or a number >= 0, e.g. {key}=10")
    return ridge


def _sums(x: np.ndarray, ridge: float):
    n = x.shape[0]
    lam_a = ridge * n
    lam_s = ridge * max(float((x**2).sum(axis=0).mean()), 1e-8)
    sxx, sx = (x**2).sum(axis=0) + lam_s, x.sum(axis=0)
    det = (n + lam_a) * sxx - sx**2
    det = np.where(det > 1e-12, det, np.inf)  # a gene without spread (ridge 0): no line, a = ds = 0
    return n + lam_a, sxx, sx, det


def fit_line(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """[2, D] (intercept, slope) of ``y ~ a + s x`` per column, ridge towards (0, 1)."""
    x, r = x.astype(np.float64), (y - x).astype(np.float64)  # what perturb_mean gets wrong: r = a + (s - 1) x
    m00, m11, m01, det = _sums(x, ridge)
    sr, sxr = r.sum(axis=0), (x * r).sum(axis=0)
    a = (m11 * sr - m01 * sxr) / det
    ds = (m00 * sxr - m01 * sr) / det
    return np.stack([a, 1.0 + ds]).astype(np.float32)


def loo_errors(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """[n] mean squared leave-one-row-out error of :func:`fit_line` per row (closed form, hat diagonal)."""
    x, r = x.astype(np.float64), (y - x).astype(np.float64)
    m00, m11, m01, det = _sums(x, ridge)
    sr, sxr = r.sum(axis=0), (x * r).sum(axis=0)
    a = (m11 * sr - m01 * sxr) / det
    ds = (m00 * sxr - m01 * sr) / det
    fitted = a + ds * x  # [n, D]
    hat = (m11 - 2.0 * m01 * x + m00 * x**2) / det  # [n, D] diagonal of X (X'X + L)^-1 X' per gene
    loo = (r - fitted) / np.maximum(1.0 - hat, 1e-6)
    return np.mean(loo**2, axis=1)


@dataclass
class ContextChoice:
    """What the CV chose for one context, and the error of every candidate (checkpoint- and log-ready)."""

    n_perts: int
    chosen: str  # a ridge as text, or PERTURB_MEAN
    candidates: list[str] = field(default_factory=list)
    cv_error: list[float] = field(default_factory=list)

    @property
    def ridge(self) -> float | None:
        return None if self.chosen == PERTURB_MEAN else float(self.chosen)

    def to_plain(self) -> dict[str, Any]:
        return {"n_perts": self.n_perts, "chosen": self.chosen, "candidates": list(self.candidates),
                "cv_error": [float(v) for v in self.cv_error]}


def cross_validate_context(x: np.ndarray, y: np.ndarray, grid=RIDGE_GRID) -> ContextChoice:
    """Leave-one-perturbation-out choice between ``perturb_mean`` and a line of each ridge in ``grid``.

    The lowest mean error marks the best candidate; the one chosen is the *simplest* candidate
    (``perturb_mean``, then the largest ridge down) whose error is within one standard error (over
    perturbations) of the best one: Breiman's one-standard-error rule. Without it a line fit to pure
    noise wins about half the time by chance over the many near-equal candidates."""
    n = x.shape[0]
    candidates = [PERTURB_MEAN]
    per_pert = [np.mean((y.astype(np.float64) - x) ** 2, axis=1)]  # perturb_mean: no fit, no LOO needed
    if n >= MIN_PERTS_FOR_LINE:
        for ridge in sorted(grid, reverse=True):
            candidates.append(f"{ridge:g}")
            per_pert.append(loo_errors(x, y, ridge))
    errors = [float(e.mean()) for e in per_pert]
    best = per_pert[int(np.argmin(errors))]
    tolerance = float(best.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    chosen = next(c for c, e in zip(candidates, errors) if e <= min(errors) + tolerance)
    return ContextChoice(n_perts=n, chosen=chosen, candidates=candidates, cv_error=errors)


def fit_context_lines(responses: Any, ridge: float | str = AUTO) -> tuple[dict[str, np.ndarray], dict[str, ContextChoice]]:
    """({context: [2, D] line}, {context: CV record}) from a :class:`MeanResponses` table.

    ``ridge``: a fixed ridge for every context, or ``auto`` (the default) to cross-validate it per
    context. With a fixed ridge the records hold that ridge and no CV errors."""
    lines: dict[str, np.ndarray] = {}
    choices: dict[str, ContextChoice] = {}
    for ctx in responses.contexts():
        perts = [p for c, p in responses.responses if c == ctx]
        x = responses.elsewhere_rows([ctx] * len(perts), perts).astype(np.float64)  # [n, D]
        y = np.stack([responses.responses[(ctx, p)] for p in perts]).astype(np.float64)  # [n, D]
        if ridge == AUTO:
            choice = cross_validate_context(x, y)
        else:
            choice = ContextChoice(n_perts=len(perts), chosen=f"{float(ridge):g}")
        if choice.ridge is None:
            lines[ctx] = np.stack([np.zeros(x.shape[1]), np.ones(x.shape[1])]).astype(np.float32)
        else:
            lines[ctx] = fit_line(x, y, choice.ridge)
        choices[ctx] = choice
    return lines, choices


def choices_from_plain(stored: Mapping[str, Any] | None) -> dict[str, ContextChoice]:
    return {str(ctx): ContextChoice(n_perts=int(v["n_perts"]), chosen=str(v["chosen"]),
                                    candidates=[str(c) for c in v.get("candidates", [])],
                                    cv_error=[float(e) for e in v.get("cv_error", [])])
            for ctx, v in (stored or {}).items()}


def format_choices(choices: Mapping[str, ContextChoice], *, title: str) -> str:
    """One readable table: a row per context, its chosen ridge and the CV error of every candidate."""
    if not choices:
        return f"{title}: no context"
    candidates = max((c.candidates for c in choices.values()), key=len)
    lines = [f"{title} (leave-one-perturbation-out MSE per candidate; * = chosen)"] if candidates else [title]
    width = max(9, *(len(str(c)) for c in choices))
    header = f"  {'context':<{width}} {'n_perts':>7} {'chosen':>12}"
    if candidates:
        header += " " + " ".join(f"{c:>12}" for c in candidates)
    lines.append(header)
    for ctx, choice in choices.items():
        row = f"  {ctx:<{width}} {choice.n_perts:>7} {choice.chosen:>12}"
        errors = dict(zip(choice.candidates, choice.cv_error))
        for cand in candidates:
            mark = "*" if cand == choice.chosen else " "
            row += " " + (f"{errors[cand]:>11.4g}{mark}" if cand in errors else f"{'-':>12}")
        lines.append(row)
    return "\n".join(lines)
