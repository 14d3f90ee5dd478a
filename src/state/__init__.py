"""state: open reimplementation of Arc Institute's State models.

Two halves:

* ``state.tx``: the State Transition model (ST) and its baselines, which predict how a set of
  control cells changes under a perturbation.
* ``state.emb``: the State Embedding model (SE), which embeds cells from their expressed genes.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
