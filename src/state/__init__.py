"""state: open reimplementation of Arc Institute's State models.

Two halves:

* ``state.tx``: the State Transition model (ST) and its baselines, which predict how a set of
  control cells changes under a perturbation.
* ``state.emb``: the State Embedding model (SE), which embeds cells from their expressed genes.

``state.api`` is the Python API (``import state; state.api.train(...)`` or ``from state import api``);
it is imported on first use, so ``import state`` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "api"]


def __getattr__(name: str):
    if name == "api":
        import importlib

        return importlib.import_module("state.api")
    raise AttributeError(f"module 'state' has no attribute {name!r}")
