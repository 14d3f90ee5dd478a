"""The additive base of a combination (``A+B``) for ``perturb_mean``, ``linear`` and ``state_plus``.

With ``model.kwargs.pert_combination=additive`` the base response of a combination in a context is
the sum of its parts' responses there (Ahlmann-Eltze et al. 2025: on Norman's doubles this additive
baseline matches or beats deep models). A part's response in a context is, in this order:

1. the mean pseudo-bulk response of the single-part labels of that part in the context (``A`` and
   ``A+ctrl`` alike);
2. else its single's mean response in the other training contexts;
3. else (a part only ever seen inside combinations: GEARS' "no part seen as a single" split) a ridge
   least-squares estimate from the context's training combinations, after the known parts' shares
   are taken off (:mod:`state.tx.models.combination_parts`).

A training combination's base uses its parts' singles, never the combination itself (case 3 aside),
so training combinations look like held-out ones, as ``elsewhere`` does for held-out contexts.
``linear`` (and ``state_plus``'s linear base) fit their per-context lines for combinations apart
from those of singles (:func:`fit_lines`): a gain per gene on the additive base is how buffering
(gain < 1) or synergy (gain > 1) shared by many combinations is learnt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from state.tx.combinations import Combinations
from state.tx.models.combination_parts import PartResponses
from state.tx.models.linear_fit import fit_context_lines
from state.tx.models.mean_response import MeanResponses

COMBO_LINES_KEY = "combination_lines"  # checkpoint: {context: [2, D]} lines of combinations
COMBO_CV_KEY = "combination_ridge_cv"


class CombinationResponses(MeanResponses):
    """:class:`MeanResponses` whose ``elsewhere`` of a combination is its additive base."""

    def __init__(self, responses: Mapping[tuple[str, str], np.ndarray], width: int, comb: Combinations) -> None:
        super().__init__(responses, width)
        self.comb = comb
        self.parts = PartResponses(self.responses, comb, self.width)

    def elsewhere(self, context: str | None, pert: str) -> np.ndarray:
        if not self.comb.is_combination(pert):
            return super().elsewhere(context, pert)
        key = (None if context is None else str(context), "\0" + str(pert))
        if key not in self._cache:
            self._cache[key] = self.parts.additive(key[0], str(pert))
        return self._cache[key]


def wrap(responses: MeanResponses | None, comb: Combinations | None) -> MeanResponses | None:
    """The response table with additive bases for combinations (unchanged when ``comb`` is None)."""
    if responses is None or comb is None or isinstance(responses, CombinationResponses):
        return responses
    return CombinationResponses(responses.responses, responses.width, comb)


class _KindView:
    """The training pairs of one kind (singles or combinations) of a table, for fitting lines."""

    def __init__(self, table: MeanResponses, combinations: bool) -> None:
        comb = table.comb
        self.table = table
        self.responses = {k: v for k, v in table.responses.items() if comb.is_combination(k[1]) == combinations}

    def contexts(self) -> list[str]:
        return sorted({c for c, _ in self.responses})

    def elsewhere_rows(self, contexts: Sequence[str] | None, perts: Sequence[str]) -> np.ndarray:
        return self.table.elsewhere_rows(contexts, perts)


def fit_lines(responses: MeanResponses, ridge: Any) -> tuple[dict, dict, dict, dict]:
    """(single lines, their CV records, combination lines, their CV records): ``fit_context_lines``
    on the singles and, apart, on the combinations (x = the additive base). Without combinations in
    the table this is ``fit_context_lines`` and two empty dicts."""
    if not isinstance(responses, CombinationResponses):
        lines, choices = fit_context_lines(responses, ridge)
        return lines, choices, {}, {}
    lines, choices = fit_context_lines(_KindView(responses, False), ridge)
    combo_lines, combo_choices = fit_context_lines(_KindView(responses, True), ridge)
    return lines, choices, combo_lines, combo_choices


def apply_combination_lines(rows: np.ndarray, contexts: Sequence[str] | None, perts: Sequence[str],
                            responses: MeanResponses, combo_lines: Mapping[str, np.ndarray]) -> np.ndarray:
    """Rows of combinations replaced by their context's combination line applied to the additive
    base (the base itself where the context has no line). ``rows`` is changed in place and returned."""
    comb = getattr(responses, "comb", None)
    if comb is None:
        return rows
    for i, pert in enumerate(perts):
        if not comb.is_combination(pert):
            continue
        ctx = None if contexts is None else str(contexts[i])
        x = responses.elsewhere(ctx, str(pert))
        line = combo_lines.get(ctx) if ctx is not None else None
        rows[i] = x if line is None else line[0] + line[1] * x
    return rows
