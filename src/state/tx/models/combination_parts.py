"""Each part's response per context, from a table of (context, label) responses (pure numpy).

Used for the additive base of combinations (:mod:`state.tx.models.combination_base`) and by
``perturb_mean`` (:func:`offsets_for`); see combination_base's docstring for the order of sources.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from state.tx.combinations import Combinations

PART_RIDGE = 1.0  # shrinks the estimate of a part never seen as a single towards 0 (few combinations carry it)
ALL = "__all__"  # the one context of perturb_mean's offsets (averaged over cell types already)


class PartResponses:
    """Each part's response per context (see the module docstring for the order of sources)."""

    def __init__(self, responses: Mapping[tuple[str, str], np.ndarray], comb: Combinations, width: int) -> None:
        self.comb, self.width = comb, int(width)
        singles: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
        combos: dict[str, list[tuple[tuple[str, ...], np.ndarray]]] = defaultdict(list)
        for (ctx, label), value in responses.items():
            parts = comb.parts(label)
            if len(parts) == 1:
                singles[ctx][parts[0]].append(np.asarray(value, np.float64))
            elif len(parts) >= 2:
                combos[ctx].append((parts, np.asarray(value, np.float64)))
        own = {ctx: {p: np.mean(v, axis=0) for p, v in by_part.items()} for ctx, by_part in singles.items()}
        self.by_context: dict[str, dict[str, np.ndarray]] = {}
        for ctx in sorted(set(own) | set(combos)):
            table = dict(own.get(ctx, {}))
            for part in {p for parts, _ in combos.get(ctx, []) for p in parts} - set(table):
                others = [t[part] for c, t in own.items() if c != ctx and part in t]
                if others:
                    table[part] = np.mean(others, axis=0)
            table.update(_solve_unseen_parts(combos.get(ctx, []), table, self.width))
            self.by_context[ctx] = table
        self._pooled: dict[str, np.ndarray] = {}
        for part in {p for t in self.by_context.values() for p in t}:
            self._pooled[part] = np.mean([t[part] for t in self.by_context.values() if part in t], axis=0)

    def part(self, context: str | None, part: str) -> np.ndarray | None:
        table = self.by_context.get(str(context)) if context is not None else None
        if table is not None and part in table:
            return table[part]
        return self._pooled.get(part)

    def additive(self, context: str | None, label: str) -> np.ndarray:
        """Sum of the parts' responses (a part known nowhere adds nothing)."""
        total = np.zeros(self.width, np.float64)
        for part in self.comb.parts(label):
            value = self.part(context, part)
            if value is not None:
                total += value
        return total.astype(np.float32)


def _solve_unseen_parts(combos: list[tuple[tuple[str, ...], np.ndarray]], known: Mapping[str, np.ndarray],
                        width: int) -> dict[str, np.ndarray]:
    """Responses of parts never seen as singles: ridge least squares over the combinations that hold
    them, on what the known parts do not explain."""
    unseen = sorted({p for parts, _ in combos for p in parts} - set(known))
    if not unseen:
        return {}
    col = {p: i for i, p in enumerate(unseen)}
    rows = [(parts, value) for parts, value in combos if any(p in col for p in parts)]
    design = np.zeros((len(rows), len(unseen)))
    target = np.zeros((len(rows), width))
    for i, (parts, value) in enumerate(rows):
        target[i] = value - sum((known[p] for p in parts if p in known), np.zeros(width))
        for p in parts:
            if p in col:
                design[i, col[p]] += 1.0
    gram = design.T @ design + PART_RIDGE * np.eye(len(unseen))
    solved = np.linalg.solve(gram, design.T @ target)
    return {p: solved[i] for p, i in col.items()}


def offsets_for(names: Sequence[str], offsets: Mapping[str, np.ndarray], comb: Combinations,
                cache: dict) -> dict[str, np.ndarray]:
    """perturb_mean: the offset of each combination name the model has no offset for, as the sum of
    its parts' offsets. ``cache`` (owned by the model) keeps the part table between batches."""
    wanted = sorted({str(n) for n in names if str(n) not in offsets and comb.is_combination(n)})
    if not wanted:
        return {}
    if cache.get("source") is not offsets:
        width = len(next(iter(offsets.values())))
        table = {(ALL, str(k)): v for k, v in offsets.items() if str(k) != comb.control}
        cache.update(source=offsets, parts=PartResponses(table, comb, width))
    return {n: cache["parts"].additive(ALL, n) for n in wanted}
