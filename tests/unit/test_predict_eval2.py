"""``tx predict --scorer cell-eval2``: the missing-extra error, and cell-eval2's tables and scaled scores."""

from __future__ import annotations

import sys

import pytest

from state.cli import run
from state.tx.predict import eval2
from state.utils.errors import StateError


def test_missing_extra_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cell_eval2", None)  # import cell_eval2 -> ImportError
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run(["tx", "predict", "--output-dir", str(run_dir), "--scorer", "cell-eval2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "cell-eval2" in err and "(fix: pip install 'state[eval2]')" in err
    assert list(run_dir.iterdir()) == []


def test_predict_only_does_not_need_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cell_eval2", None)
    from state.tx.predict.run import predict

    with pytest.raises(StateError, match="config.yaml not found"):  # got past the scorer check
        predict("/nonexistent/run", scorer="cell-eval2", predict_only=True)


def test_unknown_scorer_and_preset_are_refused():
    from state.tx.predict.run import predict

    with pytest.raises(StateError, match="unknown scorer"):
        predict("/nonexistent/run", scorer="celleval")
    pytest.importorskip("cell_eval2")
    with pytest.raises(StateError, match="unknown preset 'vcc2030'.*vcc2026"):
        eval2.require_cell_eval2("vcc2030")


def test_baselines_without_cell_eval_scoring_are_refused_before_any_work():
    from state.tx.predict.run import predict

    with pytest.raises(StateError, match="--predict-only skips"):
        predict("/nonexistent/run", baselines=True, predict_only=True)
    with pytest.raises(StateError, match="--scorer cell-eval2 does not run"):
        predict("/nonexistent/run", baselines=True, scorer="cell-eval2")
