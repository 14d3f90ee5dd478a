"""The table of registered tx models: every per-model rule, keyed by ``model.name``.

Pure data (no model code is imported), so config checks and :mod:`state.tx.config.architecture`
can ask what a model needs without loading it. :mod:`state.tx.models.registry` builds and loads the
classes named here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from state.utils.errors import StateError


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: where its class lives and how ``train`` treats it."""

    canonical: str
    target: str  # "module:Class", imported only when the model is used
    forced_max_steps: int | None = None  # statistics baselines finish in one step
    passes_basal_mapping_strategy: bool = False  # arc-state adds this kwarg for the state model only
    checkpoint_marker: str | None = None  # a top-level checkpoint key that identifies the class
    one_set_per_batch: bool = False  # arc-state forces training.batch_size=1 (cells per batch = set length)
    manual_optimization: bool = False  # the module steps its own optimizers: no Trainer gradient clipping
    extra_training_logs: bool = False  # gradient norms and FLOPs/MFU are logged (arc-state: state model only)
    lightning_free_inference: bool = False  # infer rebuilds the plain net (state.tx.infer.net), no Lightning

    def sets_per_batch(self, requested: int, set_len: int) -> int:
        """``training.batch_size`` as trained: a one-set model sees one set of ``set_len`` cells per
        step (as arc-state does), every other model ``requested`` sets."""
        return 1 if self.one_set_per_batch and set_len > 1 else requested


ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry("state", "state.tx.models.state_transition:StateTransitionPerturbationModel",
               passes_basal_mapping_strategy=True, extra_training_logs=True, lightning_free_inference=True),
    ModelEntry("state_plus", "state.tx.models.state_plus:StatePlusPerturbationModel",
               passes_basal_mapping_strategy=True, extra_training_logs=True),
    ModelEntry("perturb_mean", "state.tx.models.mean_baselines:PerturbMeanPerturbationModel",
               forced_max_steps=1, checkpoint_marker="pert_mean_offsets"),
    ModelEntry("context_mean", "state.tx.models.mean_baselines:ContextMeanPerturbationModel",
               forced_max_steps=1, checkpoint_marker="celltype_pert_means"),
    ModelEntry("linear", "state.tx.models.linear_baseline:LinearPerturbationModel",
               forced_max_steps=1, checkpoint_marker="linear_context_lines"),
    ModelEntry("embedsum", "state.tx.models.embedsum:EmbedSumPerturbationModel"),
    ModelEntry("old_neuralot", "state.tx.models.state_variants:OldNeuralOTPerturbationModel"),
    ModelEntry("decoder_only", "state.tx.models.decoder_only:DecoderOnlyPerturbationModel"),
    ModelEntry("pseudobulk", "state.tx.models.state_variants:PseudobulkPerturbationModel"),
    ModelEntry("cpa", "state.tx.models.cpa:CPAPerturbationModel", one_set_per_batch=True,
               manual_optimization=True),
    ModelEntry("scvi", "state.tx.models.scvi:ScVIPerturbationModel", one_set_per_batch=True),
    ModelEntry("scgpt-genetic", "state.tx.models.scgpt:ScGPTPerturbationModel", one_set_per_batch=True),
    ModelEntry("scgpt-chemical", "state.tx.models.scgpt:ScGPTPerturbationModel", one_set_per_batch=True),
)
# Top-level checkpoint key our zoo models write with their canonical name (arc-state never wrote one).
MODEL_NAME_KEY = "state_tx_model"
_BY_NAME = {entry.canonical: entry for entry in ENTRIES}
# arc-state's alternative spellings of the same models.
ALIASES: dict[str, str] = {
    "neuralot": "state",
    "pertsets": "state",
    "globalsimplesum": "perturb_mean",
    "celltypemean": "context_mean",
}


def available_models() -> list[str]:
    """Every accepted ``model.name`` (canonical names and arc-state's aliases)."""
    return sorted([e.canonical for e in ENTRIES] + list(ALIASES))


def model_entry(name: Any) -> ModelEntry:
    """Look a ``model.name`` up (case-insensitive, aliases allowed); unknown names raise a one-line StateError."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    entry = _BY_NAME.get(key)
    choices = ", ".join(available_models())
    if entry is None:
        raise StateError(f"unknown model.name '{name}'", hint=f"use one of: {choices} (e.g. model=state)")
    return entry
