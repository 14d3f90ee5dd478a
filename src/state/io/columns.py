"""Which obs columns and which features of an input AnnData play which role for a tx model.

An input of ``state tx infer`` (and of ``api.Run.predict``) has a perturbation column, a control
label, maybe a cell-type column and a batch column, and features (``.X`` or an obsm matrix).
:class:`ColumnChoices` holds what the caller asked for, with ``state tx infer``'s defaults (None
means "decide"); :func:`resolve_columns` turns it, once per input, into :class:`InputColumns`:
auto-detection as arc-state 0.11.1 does it and every named column or
obsm key checked to exist, with one-line errors spelled for the CLI (``--pert-col``) or the API
(``pert_col``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from state.utils.errors import StateError

DEFAULT_PERT_COL = "drugname_drugconc"  # `state tx infer --pert-col`'s default (arc-state's)
DRUG_CONTROL = "[('DMSO_TF', 0.0, 'uM')]"  # the control when the perturbation column is the default
GENETIC_CONTROL = "non-targeting"
CELLTYPE_CANDIDATES = ("cell_type", "celltype", "cellType", "ctype", "celltype_col")
BATCH_CANDIDATES = ("gem_group", "gemgroup", "batch", "donor", "plate", "experiment", "lane", "batch_id")


@dataclass(frozen=True)
class ColumnChoices:
    """The roles as the caller gave them; defaults are ``state tx infer``'s (spec tx section 1.4)."""

    pert_col: str = DEFAULT_PERT_COL
    control_pert: str | None = None  # None: the run's control, else by the perturbation column
    celltype_col: str | None = None  # None: the run's cell_type_key or a usual name, else one group
    batch_col: str | None = None  # None: the run's batch_col or a usual name (batch-encoder models only)
    embed_key: str | None = None  # obsm key of the features; None: .X


@dataclass(frozen=True)
class RunColumns:
    """What a trained run remembers about its training data's roles."""

    control_pert: str | None = None
    cell_type_key: str | None = None
    batch_col: str | None = None
    needs_batch: bool = False  # the model has a batch encoder


@dataclass(frozen=True)
class InputColumns:
    """The roles resolved against one AnnData: every name here exists in it."""

    pert_col: str
    control: str
    celltype_col: str | None  # None: all cells form one group
    batch_col: str | None  # None: the model takes no batch
    embed_key: str | None  # None: .X
    cli: bool = True  # spell option names as command-line flags (else as API keywords)

    def flag(self, name: str) -> str:
        return option_name(name, cli=self.cli)

    def labels(self, adata) -> np.ndarray:
        """The perturbation labels as strings (every comparison uses str, as arc-state does)."""
        return adata.obs[self.pert_col].astype(str).to_numpy()

    def require_controls(self, adata, *, source: str | None = None) -> int:
        """The number of control cells; one-line error when there are none."""
        labels = self.labels(adata)
        found = int((labels == self.control).sum())
        if found == 0:
            raise StateError(
                f"control label '{self.control}' not found in obs['{self.pert_col}']{_of(source)} "
                f"(present: {', '.join(sorted(set(labels))[:8])})",
                hint=f"pass {self.flag('control_pert')} with your data's control label",
            )
        return found


def option_name(name: str, *, cli: bool) -> str:
    """``pert_col`` -> ``--pert-col`` on the command line, ``pert_col`` in the API."""
    return "--" + name.replace("_", "-") if cli else name


def _of(source: str | None) -> str:
    return f" of {source}" if source else ""


def default_control(control_pert: str | None, run_control: str | None, pert_col: str) -> str:
    """``--control-pert``, else the run's, else by the perturbation column (arc-state's rule)."""
    if control_pert is not None:
        return str(control_pert)
    if run_control:
        return str(run_control)
    return DRUG_CONTROL if pert_col == DEFAULT_PERT_COL else GENETIC_CONTROL


def _obs_column(adata, explicit: str | None, candidates, *, option: str, source: str | None) -> str | None:
    """An explicit column (checked), else the first candidate present, else None."""
    if explicit is not None:
        if explicit not in adata.obs.columns:
            raise StateError(
                f"{option} '{explicit}' is not an obs column{_of(source) or ' of the input'} "
                f"(columns: {', '.join(map(str, adata.obs.columns))})",
                hint=f"pass {option} naming an existing column",
            )
        return explicit
    return next((c for c in candidates if c and c in adata.obs.columns), None)


def _check_embed_key(adata, embed_key: str | None, *, cli: bool) -> None:
    if embed_key is not None and embed_key not in adata.obsm:
        raise StateError(
            f"obsm['{embed_key}'] not found in the input (available: {', '.join(adata.obsm.keys()) or 'none'})",
            hint=f"pass {option_name('embed_key', cli=cli)} naming an existing obsm matrix, or omit it to use .X",
        )


def resolve_columns(adata, choices: ColumnChoices, run: RunColumns, *, cli: bool = True,
                    source: str | None = None) -> InputColumns:
    """Resolve and check the roles of ``adata`` once (``source`` names the file in messages)."""
    option = partial(option_name, cli=cli)
    if choices.pert_col not in adata.obs.columns:
        raise StateError(
            f"{option('pert_col')} '{choices.pert_col}' is not an obs column{_of(source)} "
            f"(columns: {', '.join(map(str, adata.obs.columns))})",
            hint=f"pass {option('pert_col')} naming the perturbation column",
        )
    celltype_col = _obs_column(adata, choices.celltype_col, (run.cell_type_key, *CELLTYPE_CANDIDATES),
                               option=option("celltype_col"), source=source)
    batch_col = None
    if run.needs_batch:
        batch_col = _obs_column(adata, choices.batch_col, (run.batch_col, *BATCH_CANDIDATES),
                                option=option("batch_col"), source=source)
        if batch_col is None:
            raise StateError("this model has a batch encoder but the input has no batch column",
                             hint=f"pass {option('batch_col')} naming the obs column with batch labels")
    _check_embed_key(adata, choices.embed_key, cli=cli)
    return InputColumns(
        pert_col=choices.pert_col,
        control=default_control(choices.control_pert, run.control_pert, choices.pert_col),
        celltype_col=celltype_col,
        batch_col=batch_col,
        embed_key=choices.embed_key,
        cli=cli,
    )
