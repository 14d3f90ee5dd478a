"""State Embedding (SE) model: fit, transform, query, preprocess, eval.

Python API: :func:`embed_anndata` embeds an in-memory AnnData with an SE checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from state.emb.embed import embed_anndata


def __getattr__(name: str):
    # Lazy: importing state.emb (e.g. for the CLI) must not pull in torch.
    if name == "embed_anndata":
        from state.emb.embed import embed_anndata

        return embed_anndata
    raise AttributeError(f"module 'state.emb' has no attribute {name!r}")


__all__ = ["embed_anndata"]
