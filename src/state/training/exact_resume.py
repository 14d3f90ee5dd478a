"""Resuming at the exact step: the random streams and the data loader's position in its epoch.

Lightning restores the model, optimizer, LR schedulers, loop counters and callbacks, but not the
process's random generators, and it restarts a plain (non-stateful) DataLoader from the start of
its epoch. :class:`ExactResume` fills both gaps, so that on CPU with a seed a run interrupted at
step k and resumed reproduces the uninterrupted run's loss at every step:

- every checkpoint carries the global random states (Python, NumPy, torch, CUDA) at save time,
  and the random states at the start of the current epoch: the global ones plus those of the
  generators inside the training dataset (cell-load's control-cell mapping draws from its own);
- on a resume in the middle of an epoch, the samplers are told their epoch (as Lightning does, but
  before the iterator is made), the epoch's random states are restored, the loader is iterated
  afresh and the batches the interrupted run already trained on are drawn and dropped (data
  loading only, no model work), then the save-time states are restored before the next step.

Several ranks: each rank has its own random streams (dropout draws, the data's generators), so
every checkpoint carries every rank's states (``ranks``, gathered when the checkpoint is made, which
every rank does together) and each rank restores its own. A resume with another number of ranks
starts the other ranks' streams from rank 0's, with a warning (the run continues, not exactly).

A loader that can save its own position (``state_dict`` / ``load_state_dict``, e.g. torchdata's
StatefulDataLoader) is left to Lightning. Limits: generators inside DataLoader *worker* processes
(``num_workers > 0``) cannot be captured, so there the batches are the same sets of cells but
random draws made in workers differ from the uninterrupted run (a loader whose draws depend only
on the epoch and the batch's items, like ``emb fit``'s, is exact with workers too).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback

log = logging.getLogger(__name__)


def global_rng_states() -> dict[str, Any]:
    # NumPy's legacy state as plain lists/ints: the restricted checkpoint unpickler loads it.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_global_rng_states(states: dict[str, Any]) -> None:
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathered(own: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's ``own`` in rank order (a collective), or None in a single process."""
    import torch.distributed as dist

    rank, world = _rank_and_world()
    if world == 1:
        return None
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, own)
    return everyone


def _own_share(saved: dict[str, Any]) -> dict[str, Any]:
    """This rank's states from a checkpoint's (rank 0's when it lacks them: an older or single-process run)."""
    rank, world = _rank_and_world()
    ranks = saved.get("ranks")
    if isinstance(ranks, list) and len(ranks) == world and isinstance(ranks[rank], dict):
        return ranks[rank]
    if world > 1 or isinstance(ranks, list):
        log.warning("the checkpoint holds the random states of %s rank(s), this run has %d: the other ranks "
                    "start from rank 0's (the run continues, not exactly as it would have)",
                    len(ranks) if isinstance(ranks, list) else 1, world)
    return {k: v for k, v in saved.items() if k != "ranks"}


# -- generators held by the dataset objects


def _generators(root: Any, *, depth: int = 5) -> dict[str, Any]:
    """Random generators reachable from ``root`` through plain object attributes and lists, by path."""
    found: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(obj: Any, path: str, level: int) -> None:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        if isinstance(obj, random.Random | np.random.Generator | np.random.RandomState):
            found[path] = obj
            return
        if isinstance(obj, list | tuple):
            if len(obj) <= 64:
                for i, item in enumerate(obj):
                    visit(item, f"{path}.{i}", level + 1)
            return
        if isinstance(obj, np.ndarray | torch.Tensor | torch.nn.Module | str | bytes | int | float | dict):
            return
        for name, value in getattr(obj, "__dict__", {}).items():
            visit(value, f"{path}.{name}" if path else name, level + 1)

    visit(root, "", 0)
    return found


def _generator_state(gen: Any) -> Any:
    if isinstance(gen, random.Random):
        return ["python", gen.getstate()]
    if isinstance(gen, np.random.Generator):
        return ["numpy", gen.bit_generator.state]
    kind, keys, pos, has_gauss, gauss = gen.get_state()
    return ["legacy", [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]]


def _set_generator_state(gen: Any, saved: Any) -> None:
    kind, state = saved
    if kind == "python":
        gen.setstate((state[0], tuple(state[1]), state[2]))
    elif kind == "numpy":
        gen.bit_generator.state = state
    else:
        gen.set_state((state[0], np.asarray(state[1], dtype=np.uint32), *state[2:]))


def _train_loaders(trainer: Any) -> list:
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    return list(combined.flattened) if combined is not None else []


def _set_sampler_epoch(trainer: Any, epoch: int) -> None:
    for loader in _train_loaders(trainer):
        samplers = {id(s): s for s in (getattr(loader, "sampler", None),
                                       getattr(getattr(loader, "batch_sampler", None), "sampler", None))}
        for sampler in samplers.values():
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)


def _stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


class ExactResume(Callback):
    """Random states and the epoch position in every checkpoint; replayed on resume (module docstring)."""

    def __init__(self) -> None:
        self._loader_states: dict[str, Any] | None = None
        self._epoch_states: dict[str, Any] | None = None
        self._batches_in_epoch = 0
        self._loaded: dict[str, Any] | None = None
        self._restore_at_first_step: dict[str, Any] | None = None

    # -- recording (every run)
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # The states the training loader is built from (after the sanity check, which Lightning runs
        # with isolated random states) decide its fixed cell sets; a resume rebuilds it from them.
        self._loader_states = global_rng_states()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # Called after Lightning's set_epoch and before the epoch's first batch is drawn.
        self._batches_in_epoch = 0
        self._epoch_states = {"global": global_rng_states(), "data": self._data_states(trainer)}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batches_in_epoch = batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        own = {"rng": global_rng_states(), "data_rng": self._data_states_or_none(), "loader_rng": self._loader_states,
               "epoch_rng": self._epoch_states, "batches_in_epoch": self._batches_in_epoch}
        ranks = _gathered(own)
        return own if ranks is None else {**ranks[0], "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = _own_share(state_dict)

    # -- replaying (a resumed run)
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        loaded, self._loaded = self._loaded, None
        if not loaded or "rng" not in loaded:
            return
        try:
            if any(map(_stateful, _train_loaders(trainer))):  # the loader restores its own position
                # After Lightning makes the loader's iterator (which draws the workers' base seed from
                # torch's generator): the first step then starts from the save-time states.
                self._restore_at_first_step = loaded["rng"]
                return
            self._loader_states = loaded.get("loader_rng")
            if self._loader_states:
                set_global_rng_states(self._loader_states)
                self._rebuild_loader(trainer)
            done = int(loaded.get("batches_in_epoch") or 0)
            if 0 < done < trainer.num_training_batches and loaded.get("epoch_rng"):
                self._replay(trainer, loaded["epoch_rng"], done)
                # Validation shares the dataset's generators: continue from their save-time states.
                self._set_data_states(trainer, loaded.get("data_rng") or {})
                # Lightning's set_epoch, still to come for this epoch, draws again: restore after it.
                self._restore_at_first_step = loaded["rng"]
            else:
                set_global_rng_states(loaded["rng"])
                self._set_data_states(trainer, loaded.get("data_rng") or {})
                self._restart_iterator(trainer)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # an older or foreign checkpoint
            log.warning("could not restore the random states of the checkpoint (%s); continuing with fresh ones", exc)

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if self._restore_at_first_step is not None:
            set_global_rng_states(self._restore_at_first_step)
            self._restore_at_first_step = None

    def _data_states_or_none(self) -> dict[str, Any] | None:
        trainer = getattr(self, "_trainer", None)
        return self._data_states(trainer) if trainer is not None else None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = None

    @staticmethod
    def _data_states(trainer: Any) -> dict[str, Any]:
        states = {}
        for i, loader in enumerate(_train_loaders(trainer)):
            for path, gen in _generators(getattr(loader, "dataset", None)).items():
                states[f"{i}:{path}"] = _generator_state(gen)
        return states

    @staticmethod
    def _set_data_states(trainer: Any, saved: dict[str, Any]) -> None:
        for i, loader in enumerate(_train_loaders(trainer)):
            for path, gen in _generators(getattr(loader, "dataset", None)).items():
                if f"{i}:{path}" in saved:
                    _set_generator_state(gen, saved[f"{i}:{path}"])

    def _replay(self, trainer: Any, epoch_states: dict[str, Any], done: int) -> None:
        # Lightning tells the samplers their epoch only later (after this hook); an epoch-keyed order
        # (DistributedSampler, emb's EpochShuffle) must know it before the iterator is made.
        _set_sampler_epoch(trainer, int(trainer.fit_loop.epoch_progress.current.processed))
        set_global_rng_states(epoch_states["global"])
        self._set_data_states(trainer, epoch_states.get("data") or {})
        self._epoch_states = epoch_states  # a later save in this epoch needs them again
        fetcher = self._restart_iterator(trainer)
        for _ in range(done):
            next(fetcher.iterator)
        self._batches_in_epoch = done
        log.info("resumed in the middle of an epoch: skipped the %d batches already trained on", done)

    @staticmethod
    def _rebuild_loader(trainer: Any) -> None:
        fit_loop = trainer.fit_loop
        if fit_loop._data_fetcher is not None:
            fit_loop._data_fetcher.teardown()
        fit_loop._combined_loader = None
        fit_loop.setup_data()

    @staticmethod
    def _restart_iterator(trainer: Any) -> Any:
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is not None:
            iter(fetcher)
        return fetcher
