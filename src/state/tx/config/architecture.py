"""The State Transition architecture as one typed, frozen object: the owner of every shape fact.

Cells per set, the backbone positions they imply, the dims, the backbone and the gene decoder used to
be worked out separately by the config check, ``train``, the model, the net rebuild and ``infer``
(each with its own precedence and default), so a config could make the data loader and the model
disagree. :class:`TransitionConfig` is built once, from a Hydra ``model`` config when training
(:meth:`TransitionConfig.from_model_config`) or from a checkpoint's ``hyper_parameters``
(:meth:`TransitionConfig.from_hparams`), and every consumer reads it.

:func:`cells_per_set` is THE set-length rule; nothing else looks at ``cell_set_len``,
``cell_sentence_len``, ``n_positions`` or ``max_position_embeddings`` to count cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from state.tx.models.entries import model_entry
from state.utils.errors import StateError

# arc-state's State Transition model falls back to 128 cells when its kwargs carry no cell_set_len.
MODEL_DEFAULT_SET_LEN = 128
# infer's window when neither the checkpoint nor the run's config tells the set length.
WINDOW_DEFAULT_SET_LEN = 512
# The gene decoder arc-state attaches when model.kwargs leave its layout out.
DEFAULT_DECODER_HIDDEN_DIMS = (1024, 1024, 512)
DEFAULT_DECODER_DROPOUT = 0.1
DEFAULT_GENE_DIM = 2000


def cells_per_set(
    kwargs: Mapping[str, Any],
    *,
    one_set_per_batch: bool = False,
    top_level: Any = None,
    saved: bool = False,
) -> int | None:
    """Cells per set (None when nothing tells): the one set-length rule.

    ``kwargs`` is a Hydra ``model.kwargs`` or, with ``saved=True``, a checkpoint's
    ``hyper_parameters`` (the same flat keys). ``one_set_per_batch``: the model sees one set of
    ``cell_sentence_len`` cells per step (the registry says which: cpa, scvi, scgpt-*).

    From a config, the first value given of: the model-level ``model.cell_set_len``
    (``top_level``); ``cell_sentence_len`` for one-set models; the backbone's ``n_positions``; its
    ``max_position_embeddings``; ``cell_set_len`` (where arc-state's ``train`` looks, plus the last
    step it lacked). ``train`` writes the result back under the model's own key
    (:meth:`TransitionConfig.model_kwargs`), so from saved hyper-parameters only that key is read:
    their ``n_positions`` also counts the extra tokens, so it is no cell count.
    """
    own_key = "cell_sentence_len" if one_set_per_batch else "cell_set_len"
    if saved:
        candidates = [kwargs.get(own_key)]
    else:
        backbone = kwargs.get("transformer_backbone_kwargs") or {}
        candidates = [
            top_level,
            kwargs.get("cell_sentence_len") if one_set_per_batch else None,
            backbone.get("n_positions"),
            backbone.get("max_position_embeddings"),
            kwargs.get("cell_set_len"),
        ]
    return next((int(value) for value in candidates if value is not None), None)


def model_set_length(model_cfg: Mapping[str, Any]) -> int | None:
    """:func:`cells_per_set` of a Hydra ``model`` node (``name``, optional ``cell_set_len``, ``kwargs``)."""
    return cells_per_set(
        model_cfg.get("kwargs") or {},
        one_set_per_batch=_one_set_per_batch(model_cfg.get("name")),
        top_level=model_cfg.get("cell_set_len"),
    )


def _one_set_per_batch(name: Any) -> bool:
    try:
        return model_entry(name).one_set_per_batch
    except StateError:  # an unknown model.name is reported by the config check and the registry
        return False


def trained_set_length(
    hparams: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None, *,
    default: int = WINDOW_DEFAULT_SET_LEN,
) -> int:
    """Cells per set of a trained model: from its saved hyper-parameters, else from its run's
    ``model`` config, else ``default``."""
    model_cfg = model_cfg or {}
    one_set = _one_set_per_batch(model_cfg.get("name"))
    length = cells_per_set(hparams, one_set_per_batch=one_set, saved=True)
    if length is None and model_cfg:
        length = model_set_length(model_cfg)
    return default if length is None else length


def gene_decoder_config(
    model_kwargs: Mapping[str, Any], var_dims: Mapping[str, Any], output_space: str
) -> dict[str, Any] | None:
    """The gene decoder arc-state attaches for gene/all output spaces, key order kept."""
    if output_space == "embedding":
        return None
    gene_dim = var_dims.get("hvg_dim") if output_space == "gene" else var_dims.get("gene_dim")
    return {
        "latent_dim": var_dims["output_dim"],
        "gene_dim": gene_dim or DEFAULT_GENE_DIM,
        "hidden_dims": list(model_kwargs.get("decoder_hidden_dims") or DEFAULT_DECODER_HIDDEN_DIMS),
        "dropout": model_kwargs.get("decoder_dropout") or DEFAULT_DECODER_DROPOUT,
        "residual_decoder": model_kwargs.get("residual_decoder") or False,
    }


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _data_dims(source: Mapping[str, Any]) -> dict[str, int | None]:
    """The widths the data fixes (var_dims at train time; the same keys in saved hyper_parameters)."""
    return {key: _optional_int(source.get(key)) for key in ("input_dim", "output_dim", "pert_dim", "batch_dim")}


def _model_sizes(source: Mapping[str, Any]) -> dict[str, Any]:
    """The sizes the model config fixes (model.kwargs at train time; the same keys in hyper_parameters)."""
    return {
        "extra_tokens": int(source.get("extra_tokens") or 0),
        "hidden_dim": _optional_int(source.get("hidden_dim")),
        "backbone_key": str(source.get("transformer_backbone_key", "llama")),
        "backbone_kwargs": source.get("transformer_backbone_kwargs") or {},
    }


@dataclass(frozen=True)
class TransitionConfig:
    """What shapes a tx model: set length and positions, dims, backbone, gene decoder.

    ``backbone_kwargs`` are the configured ones (``n_positions`` as given, if at all);
    :meth:`backbone_hparams` gives what the model saves and builds with (``n_positions`` = set
    length + extra tokens). Mappings are read-only views.
    """

    set_len: int
    extra_tokens: int = 0
    one_set_per_batch: bool = False
    input_dim: int | None = None
    hidden_dim: int | None = None
    output_dim: int | None = None
    pert_dim: int | None = None
    batch_dim: int | None = None
    backbone_key: str = "llama"
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)
    decoder: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbone_kwargs", _frozen(self.backbone_kwargs))
        if self.decoder is not None:
            object.__setattr__(self, "decoder", _frozen(self.decoder))

    @property
    def n_positions(self) -> int:
        """Backbone positions: one per cell plus the extra (batch / confidence) tokens."""
        return self.set_len + self.extra_tokens

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model_config(
        cls, model_cfg: Mapping[str, Any], *, var_dims: Mapping[str, Any], output_space: str
    ) -> TransitionConfig | None:
        """From a Hydra ``model`` node and the data facts ``train`` reads (var_dims, output space).

        None when the config tells no set length.
        """
        kwargs = model_cfg.get("kwargs") or {}
        set_len = model_set_length(model_cfg)
        if set_len is None:
            return None
        return cls(
            set_len=set_len,
            one_set_per_batch=_one_set_per_batch(model_cfg.get("name")),
            **_data_dims(var_dims),
            **_model_sizes(kwargs),
            decoder=gene_decoder_config(kwargs, var_dims, output_space),
        )

    @classmethod
    def from_hparams(
        cls, hparams: Mapping[str, Any], *, default_set_len: int = MODEL_DEFAULT_SET_LEN,
        one_set_per_batch: bool = False,
    ) -> TransitionConfig:
        """From a checkpoint's ``hyper_parameters`` (or a model's constructor keywords)."""
        set_len = cells_per_set(hparams, one_set_per_batch=one_set_per_batch, saved=True)
        return cls(
            set_len=default_set_len if set_len is None else set_len,
            one_set_per_batch=one_set_per_batch,
            **_data_dims(hparams),
            **_model_sizes(hparams),
            decoder=hparams.get("decoder_cfg"),
        )

    # ------------------------------------------------------------------ what gets written
    def backbone_hparams(self) -> dict[str, Any]:
        """``transformer_backbone_kwargs`` as saved and built: ``n_positions`` set in place (or appended)."""
        return {**self.backbone_kwargs, "n_positions": self.n_positions}

    def model_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``model.kwargs`` as the model is constructed with (and saves): arc-state's keys in their
        order, the resolved set length under the model's own key (so a model reads the length the
        data loader was given, e.g. after a ``transformer_backbone_kwargs.n_positions=N`` override),
        the gene decoder filled in (or switched off)."""
        out = dict(kwargs)
        out["cell_sentence_len" if self.one_set_per_batch else "cell_set_len"] = self.set_len
        if self.decoder is None:
            out.pop("decoder_cfg", None)
            out["gene_decoder_bool"] = False
        else:
            out["decoder_cfg"] = dict(self.decoder)
        return out
