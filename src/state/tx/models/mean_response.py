"""Per-context pseudo-bulk responses of the training split, shared by ``linear`` and ``state_plus``.

A *response* is a pseudo-bulk delta: the mean of the cells of (context, perturbation) minus the
mean of that context's control cells. The table keeps one response per training (context,
perturbation) pair and answers the question both models ask:

    what does this perturbation do *elsewhere*?  ->  ``elsewhere(context, perturbation)``

the mean response over the training contexts other than ``context`` (all contexts when the
context is unknown; zeros when the perturbation was never seen anywhere else). Leaving the own
context out makes a training pair look like a held-out one: a model that learns "response here
from response elsewhere" on training pairs meets the same kind of input at test time.

The table travels in checkpoints as plain numpy arrays under :data:`CHECKPOINT_KEY`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from state.utils.errors import StateError

CHECKPOINT_KEY = "mean_responses"


class MeanResponses:
    """Training responses by (context, perturbation); see the module docstring."""

    def __init__(self, responses: Mapping[tuple[str, str], np.ndarray], width: int) -> None:
        self.responses = {(str(c), str(p)): np.asarray(v, dtype=np.float32).reshape(-1)
                          for (c, p), v in responses.items()}
        self.width = int(width)
        self._by_pert: dict[str, dict[str, np.ndarray]] = {}
        for (ctx, pert), value in self.responses.items():
            self._by_pert.setdefault(pert, {})[ctx] = value
        self._cache: dict[tuple[str | None, str], np.ndarray] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_group_sums(cls, sums: Any, control: str) -> MeanResponses:
        """From running (context, perturbation) sums (``mean_baselines._GroupSums``)."""
        ctrl = {ct: sums.mean((ct, p)) for ct, p in sums.sums if p == control}
        if not ctrl:
            raise StateError(f"no control cells ('{control}') in the training split; "
                             "pseudo-bulk responses need them")
        responses = {(ct, p): sums.mean((ct, p)) - ctrl[ct]
                     for ct, p in sums.sums if p != control and ct in ctrl}
        width = len(next(iter(ctrl.values())))
        return cls(responses, width)

    @classmethod
    def from_datamodule(cls, datamodule: Any, control: str) -> MeanResponses:
        """One pass over the training loader (cell-load batches: cell_type, pert_name, pert_cell_emb)."""
        from state.tx.models.mean_baselines import _GroupSums

        sums = _GroupSums()
        with torch.no_grad():
            for batch in datamodule.train_dataloader():
                sums.add(batch["cell_type"], batch["pert_name"], batch["pert_cell_emb"])
        if not sums.sums:
            raise StateError("the training split holds no cells; cannot compute pseudo-bulk responses")
        return cls.from_group_sums(sums, control)

    # ------------------------------------------------------------------ checkpoints
    def to_checkpoint(self) -> dict[str, Any]:
        keys = sorted(self.responses)
        values = np.stack([self.responses[k] for k in keys]) if keys else np.zeros((0, self.width), np.float32)
        return {"contexts": np.array([k[0] for k in keys], dtype=object).tolist(),
                "perturbations": np.array([k[1] for k in keys], dtype=object).tolist(),
                "values": values, "width": self.width}

    @classmethod
    def from_checkpoint(cls, stored: Mapping[str, Any]) -> MeanResponses:
        values = np.asarray(stored["values"], dtype=np.float32)
        keys = zip(stored["contexts"], stored["perturbations"])
        return cls({k: v for k, v in zip(keys, values)}, int(stored["width"]))

    # ------------------------------------------------------------------ queries
    def contexts(self) -> list[str]:
        return sorted({c for c, _ in self.responses})

    def elsewhere(self, context: str | None, pert: str) -> np.ndarray:
        """Mean response of ``pert`` over training contexts other than ``context`` (zeros if none)."""
        key = (None if context is None else str(context), str(pert))
        if key not in self._cache:
            seen = self._by_pert.get(key[1], {})
            others = [v for c, v in seen.items() if c != key[0]]
            self._cache[key] = np.mean(others, axis=0) if others else np.zeros(self.width, np.float32)
        return self._cache[key]

    def elsewhere_rows(self, contexts: Sequence[str] | None, perts: Iterable[str]) -> np.ndarray:
        """:meth:`elsewhere` for each cell: [N, width] (contexts None -> every context counts)."""
        perts = [str(p) for p in perts]
        ctxs = [None] * len(perts) if contexts is None else [str(c) for c in contexts]
        return np.stack([self.elsewhere(c, p) for c, p in zip(ctxs, perts)]) if perts else \
            np.zeros((0, self.width), np.float32)
