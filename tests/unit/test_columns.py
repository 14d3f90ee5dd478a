"""The column roles of an infer input: one resolution rule and one set of defaults for the CLI and the API."""

from __future__ import annotations

import dataclasses
import inspect

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from state import api
from state.cli import build_parser
from state.io.columns import ColumnChoices, RunColumns, resolve_columns
from state.utils.errors import StateError


def _cells(**obs) -> ad.AnnData:
    n = len(next(iter(obs.values())))
    adata = ad.AnnData(X=np.zeros((n, 3), np.float32), obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(n)]))
    adata.obsm["X_emb"] = np.zeros((n, 2), np.float32)
    return adata


def test_cli_and_api_share_the_documented_defaults():
    args = build_parser().parse_args(["tx", "infer", "--adata", "a.h5ad", "--model-dir", "r"])
    choices = ColumnChoices()
    for field in dataclasses.fields(ColumnChoices):
        assert getattr(args, field.name) == getattr(choices, field.name), field.name
    predict = inspect.signature(api.Run.predict).parameters
    for name in ("pert_col", "control_pert", "celltype_col", "batch_col"):
        assert predict[name].default == getattr(choices, name), name


def test_control_label_rule():
    cells = _cells(drugname_drugconc=["a", "b"], gene=["x", "y"])
    assert resolve_columns(cells, ColumnChoices(), RunColumns()).control == "[('DMSO_TF', 0.0, 'uM')]"
    assert resolve_columns(cells, ColumnChoices(pert_col="gene"), RunColumns()).control == "non-targeting"
    assert resolve_columns(cells, ColumnChoices(pert_col="gene"), RunColumns(control_pert="ctl")).control == "ctl"
    given = ColumnChoices(pert_col="gene", control_pert="DMSO")
    assert resolve_columns(cells, given, RunColumns(control_pert="ctl")).control == "DMSO"


def test_cell_type_and_batch_detection():
    cells = _cells(gene=["x", "y"], celltype=["A", "B"], donor_type=["A", "A"], plate=["p", "q"], lane=["1", "2"])
    run = RunColumns(cell_type_key="donor_type", batch_col="lane")
    got = resolve_columns(cells, ColumnChoices(pert_col="gene"), run)
    assert got.celltype_col == "donor_type" and got.batch_col is None  # no batch encoder: no batch column
    assert resolve_columns(cells, ColumnChoices(pert_col="gene"), RunColumns()).celltype_col == "celltype"
    with_batch = dataclasses.replace(run, needs_batch=True)
    assert resolve_columns(cells, ColumnChoices(pert_col="gene"), with_batch).batch_col == "lane"
    assert resolve_columns(cells, ColumnChoices(pert_col="gene"), RunColumns(needs_batch=True)).batch_col == "plate"
    with pytest.raises(StateError, match="has a batch encoder but the input has no batch column"):
        resolve_columns(_cells(gene=["x"]), ColumnChoices(pert_col="gene"), RunColumns(needs_batch=True))


@pytest.mark.parametrize(("choices", "cli_text", "api_text"), [
    (ColumnChoices(pert_col="nope"), "--pert-col 'nope' is not an obs column of in.h5ad",
     "pert_col 'nope' is not an obs column"),
    (ColumnChoices(pert_col="gene", celltype_col="nope"), "--celltype-col 'nope'", "celltype_col 'nope'"),
    (ColumnChoices(pert_col="gene", embed_key="X_missing"), "--embed-key naming", "embed_key naming"),
])  # fmt: skip
def test_errors_are_one_line_and_spelled_for_the_caller(choices, cli_text, api_text):
    cells = _cells(gene=["x", "y"])
    with pytest.raises(StateError) as cli:
        resolve_columns(cells, choices, RunColumns(), cli=True, source="in.h5ad")
    with pytest.raises(StateError) as py:
        resolve_columns(cells, choices, RunColumns(), cli=False)
    assert cli_text in cli.value.one_line() and api_text in py.value.one_line()
    assert "--" not in py.value.one_line() and "\n" not in cli.value.one_line()


def test_require_controls_counts_or_names_the_label():
    cells = _cells(gene=["ctl", "x", "ctl"])
    columns = resolve_columns(cells, ColumnChoices(pert_col="gene", control_pert="ctl"), RunColumns(), cli=False)
    assert columns.require_controls(cells) == 2
    other = dataclasses.replace(columns, control="DMSO")
    with pytest.raises(StateError, match=r"control label 'DMSO' not found in obs\['gene'\] \(present: ctl, x\)"):
        other.require_controls(cells)


def test_label_errors_name_the_option_as_the_caller_spells_it():
    from types import SimpleNamespace

    from state.tx.infer.run import check_labels

    cells = _cells(gene=["ctl", "mystery", "ctl"])
    predictor = SimpleNamespace(pert_names=["known"])
    labels, groups = np.array(["ctl", "mystery", "ctl"]), np.array(["A", "A", "A"])
    for cli, flag in [(True, "--unknown-as-control"), (False, "unknown_as_control=True")]:
        columns = resolve_columns(cells, ColumnChoices(pert_col="gene", control_pert="ctl"), RunColumns(), cli=cli)
        with pytest.raises(StateError, match="unknown to the model: mystery") as info:
            check_labels(labels, groups, predictor, columns, unknown_as_control=False)
        assert flag in info.value.one_line()
        check_labels(labels, groups, predictor, columns, unknown_as_control=True)  # allowed when asked for
    columns = resolve_columns(cells, ColumnChoices(pert_col="gene", control_pert="ctl"), RunColumns(), cli=True)
    with pytest.raises(StateError, match=r"no control cells \('ctl'\) in cell type\(s\) B") as info:
        check_labels(labels, np.array(["A", "B", "A"]), predictor, columns, unknown_as_control=True)
    assert "--celltypes" in info.value.one_line()
