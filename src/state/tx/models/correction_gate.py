"""Does state_plus's learned correction earn its keep over its base? (pure numpy + a little torch)

state_plus predicts ``control cell + base response + blend * correction``, where the base is the
``linear`` (or ``elsewhere``) response and the correction is the network's output. The blend is
chosen on perturbations the correction never trained on:

* the ``val`` perturbations of the TOML (the contexts that have some), and
* for every training context without ``val`` perturbations, a held-out share of its training
  perturbations (:func:`held_out_groups`, chosen from the training seed), whose sets are left out
  of the loss.

Per held-out (context, perturbation) group ``g`` the judge keeps the pseudo-bulk of the correction
``c_g`` and of what the base gets wrong ``r_g = mean(target) - mean(base prediction)``. Blending
with ``w`` leaves the error ``sum_g |r_g - w c_g|^2``; the best ``w`` is a one-dimensional least
squares, clipped to [0, 1] (0 = the base alone, 1 = the full correction). To judge ``w`` on data it
was not chosen on, :func:`choose_blend` scores it leave-one-group-out; the correction earns its
keep only when that error is below the base's own by more than one standard error of the per-group
differences (the one-standard-error rule the ``linear`` ridge CV uses: a tie goes to the base). Otherwise the blend is 0: state_plus predicts its
base and says so. No constant here decides quality: the blend and the verdict come from the data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MIN_GROUPS = 2  # leave-one-group-out needs at least two groups to fit a blend on one and judge it on another


@dataclass
class GateDecision:
    blend: float  # 0 = base only, 1 = full correction
    base_error: float  # mean squared pseudo-bulk error of the base on the judged groups
    cv_error: float  # leave-one-group-out error of the blended prediction (nan: too few groups)
    n_groups: int
    step: int = 0

    @property
    def earns_keep(self) -> bool:
        return self.blend > 0.0

    @property
    def score(self) -> float:
        """The error the gated prediction is expected to make (lower is better)."""
        return self.cv_error if self.earns_keep else self.base_error

    def to_plain(self) -> dict[str, Any]:
        return {"step": int(self.step), "blend": float(self.blend), "base_error": float(self.base_error),
                "cv_error": float(self.cv_error), "n_groups": int(self.n_groups)}


def choose_blend(corrections: np.ndarray, residuals: np.ndarray, *, step: int = 0) -> GateDecision:
    """``corrections`` c_g and ``residuals`` r_g, both [G, D]: the blend and its leave-one-group-out judgement."""
    c, r = np.asarray(corrections, np.float64), np.asarray(residuals, np.float64)
    n = c.shape[0]
    base = float(np.mean(r**2)) if n else float("nan")
    if n < MIN_GROUPS:
        return GateDecision(0.0, base, float("nan"), n, step)
    cr, cc = (c * r).sum(axis=1), (c * c).sum(axis=1)  # [G]
    num, den = cr.sum(), cc.sum()
    loo_w = np.clip(np.divide(num - cr, den - cc, out=np.zeros(n), where=(den - cc) > 0), 0.0, 1.0)
    per_group = np.mean((r - loo_w[:, None] * c) ** 2, axis=1) - np.mean(r**2, axis=1)  # [G] gain < 0
    cv = base + float(per_group.mean())
    margin = float(per_group.std(ddof=1) / np.sqrt(n))  # one standard error: ties go to the base
    blend = float(np.clip(num / den, 0.0, 1.0)) if den > 0 and per_group.mean() + margin < 0 else 0.0
    return GateDecision(blend, base, cv, n, step)


def held_out_groups(groups: Iterable[tuple[str, str]], *, skip_contexts: Iterable[str], seed: int,
                    fraction: float, max_groups: int) -> set[tuple[str, str]]:
    """A ``fraction`` (at least 2) of each context's training perturbations, for contexts not in
    ``skip_contexts`` (those judged on their ``val`` perturbations) with at least 5 of them (so 3
    or more stay for training); chosen by a generator seeded from ``seed`` and the context name,
    at most ``max_groups`` in all (spread evenly over the contexts)."""
    by_ctx: dict[str, list[str]] = {}
    for ctx, pert in groups:
        by_ctx.setdefault(str(ctx), []).append(str(pert))
    skip = {str(c) for c in skip_contexts}
    eligible = {c: sorted(p) for c, p in sorted(by_ctx.items()) if c not in skip and len(p) >= 5}
    if not eligible or fraction <= 0:
        return set()
    cap = max(MIN_GROUPS, max_groups // len(eligible))
    chosen: set[tuple[str, str]] = set()
    for ctx, perts in eligible.items():
        k = min(cap, len(perts) - 3, max(MIN_GROUPS, round(fraction * len(perts))))
        rng = np.random.default_rng([int(seed), *ctx.encode()])
        chosen.update((ctx, p) for p in rng.choice(perts, size=k, replace=False))
    return chosen


class GroupSums:
    """Running per-group sums of the correction and of the base's miss, for :func:`choose_blend`."""

    def __init__(self) -> None:
        self.correction: dict[tuple[str, str], np.ndarray] = {}
        self.residual: dict[tuple[str, str], np.ndarray] = {}
        self.count: dict[tuple[str, str], int] = {}

    def add(self, keys: list[tuple[str, str]], correction: np.ndarray, residual: np.ndarray) -> None:
        """Per-cell rows ([N, D] each) with their group keys."""
        for key in sorted(set(keys)):
            rows = np.array([k == key for k in keys])
            self.correction[key] = self.correction.get(key, 0.0) + correction[rows].sum(axis=0)
            self.residual[key] = self.residual.get(key, 0.0) + residual[rows].sum(axis=0)
            self.count[key] = self.count.get(key, 0) + int(rows.sum())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keys = sorted(self.count)
        if not keys:
            return np.zeros((0, 0)), np.zeros((0, 0))
        c = np.stack([self.correction[k] / self.count[k] for k in keys])
        r = np.stack([self.residual[k] / self.count[k] for k in keys])
        return c, r


def describe(record: Mapping[str, Any] | None) -> str:
    """One line for logs and ``tx predict``: the blend, what it was judged on, and the verdict."""
    if not record:
        return "state_plus gate: none recorded (a checkpoint from before the gate: full correction)"
    last = record.get("chosen") or {}
    blend = float(record.get("blend", 1.0))
    where = f"{last.get('n_groups', 0)} held-out groups ({record.get('source', '?')})"
    if blend > 0:
        return (f"state_plus gate: blend {blend:.3f} of the learned correction (chosen at step {last.get('step')}, "
                f"judged on {where}: error {last.get('cv_error', float('nan')):.4g} vs base "
                f"{last.get('base_error', float('nan')):.4g})")
    return (f"state_plus gate: blend 0 -- the learned correction never beat its base on {where}; "
            "predicting the base (the linear / elsewhere response) alone")


def _rows_of(batch: Mapping[str, Any], rows: np.ndarray, n: int, *, to_host: bool = False) -> dict[str, Any]:
    """The cells ``rows`` of a flat batch of ``n`` cells (tensors, arrays and lists indexed alike)."""
    import torch

    index = torch.as_tensor(rows, dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
            value = value[index.to(value.device)]
            out[key] = value.detach().to("cpu", copy=True) if to_host else value
        elif isinstance(value, np.ndarray) and value.ndim and value.shape[0] == n:
            out[key] = value[rows]
        elif isinstance(value, Sequence) and not isinstance(value, str | bytes) and len(value) == n:
            out[key] = [value[i] for i in rows]  # lists, and the fast loader's lazily made names
        else:
            out[key] = value
    return out


class Judge:
    """The gate's state during one fit: which groups are held out (and one cached set of each), the
    running sums of the current validation, and every decision so far with the best one."""

    def __init__(self, *, control: str, max_groups: int) -> None:
        self.control = control
        self.max_groups = max_groups
        self.uses_val = False
        self.held_out: set[tuple[str, str]] = set()
        self.held_out_sets: dict[tuple[str, str], dict[str, Any]] = {}
        self.source = ""
        self.sums = GroupSums()
        self.history: list[GateDecision] = []
        self.best: GateDecision | None = None
        self.snapshot: dict[str, Any] | None = None

    def start(self, model: Any, datamodule: Any, set_len: int) -> None:
        """Pick the held-out groups: a share of the training perturbations of every context that has no
        ``val`` perturbations (cell-load's validation loader falls back to the *test* split when the
        TOML has no val entries, so it is only used when real val datasets exist)."""
        self.uses_val = bool(getattr(datamodule, "val_datasets", None))
        val_groups: set[tuple[str, str]] = set()
        if self.uses_val:
            for batch in datamodule.val_dataloader():
                val_groups.update(zip(map(str, batch["cell_type"]), map(str, batch["pert_name"])))
        val_groups = {g for g in val_groups if g[1] != self.control}
        self.held_out = held_out_groups(
            model.responses.responses.keys(), skip_contexts={c for c, _ in val_groups},
            seed=int(model.hparams.get("train_seed", 42)), fraction=model.gate_holdout_fraction,
            max_groups=self.max_groups)
        self.source = (f"{len(val_groups)} val perturbation(s) of the TOML + {len(self.held_out)} training "
                       f"perturbation(s) held out of the loss in {len({c for c, _ in self.held_out})} context(s)")
        log.info("state_plus gate: judging the correction on %s", self.source)
        if self.held_out:
            self.cache_held_out_sets(datamodule, set_len)

    def cache_held_out_sets(self, datamodule: Any, set_len: int) -> None:
        """One set of every held-out group, kept on the host, from a pass over the training loader that
        stops as soon as each group has one: every judgement then sees the same groups."""
        for batch in datamodule.train_dataloader():
            if len(self.held_out_sets) == len(self.held_out):
                break
            names, contexts = batch["pert_name"], batch["cell_type"]
            n = len(names)
            for s in range(n // set_len):
                key = (str(contexts[s * set_len]), str(names[s * set_len]))
                if key in self.held_out and key not in self.held_out_sets:
                    rows = np.arange(s * set_len, (s + 1) * set_len)
                    self.held_out_sets[key] = _rows_of(batch, rows, n, to_host=True)
        missing = len(self.held_out) - len(self.held_out_sets)
        if missing:
            log.warning("state_plus gate: %d held-out group(s) had no whole set in the training loader", missing)

    def keep_for_training(self, batch: Mapping[str, Any], set_len: int) -> dict[str, Any] | None:
        """The batch without the sets of held-out groups; None when nothing is left."""
        names, contexts = batch["pert_name"], batch["cell_type"]
        n = len(names)
        held = [(str(contexts[i]), str(names[i])) in self.held_out for i in range(0, n, set_len)]
        if not any(held):
            return dict(batch)
        kept = [np.arange(s * set_len, (s + 1) * set_len) for s in range(len(held)) if not held[s]]
        return _rows_of(batch, np.concatenate(kept), n) if kept else None

    def reset_val(self) -> None:
        self.sums = GroupSums()

    def add(self, batch: Mapping[str, Any], correction: Any, base: Any) -> None:
        """One batch's cells: their correction and what the base misses (target - base)."""
        width = correction.shape[-1]
        c = correction.detach().reshape(-1, width).float().cpu().numpy()
        b = base.detach().reshape(-1, width).float().cpu().numpy()
        target = batch["pert_cell_emb"].detach().reshape(-1, width).float().cpu().numpy()
        keys = [(str(ct), str(p)) for ct, p in zip(batch["cell_type"], batch["pert_name"])]
        rows = np.array([k[1] != self.control for k in keys], dtype=bool)
        if rows.any():
            self.sums.add([k for k, r in zip(keys, rows) if r], c[rows], target[rows] - b[rows])

    def decide(self, step: int) -> GateDecision:
        corrections, residuals = self.sums.arrays()
        decision = choose_blend(corrections, residuals, step=step)
        self.history.append(decision)
        if self.best is None or not np.isfinite(self.best.score) or decision.score < self.best.score:
            self.best = decision
        return decision

    def record(self, decision: GateDecision) -> dict[str, Any]:
        """What goes into the checkpoint (plain types only: loads with weights_only=True)."""
        return {"blend": float(decision.blend), "source": self.source, "chosen": decision.to_plain(),
                "history": [d.to_plain() for d in self.history]}
