"""Combinatorial perturbations: labels encoded from their parts, the additive base, GEARS' split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from state.tx.combination_splits import gears_split, write_split_toml
from state.tx.combinations import Combinations, combination_map, compose, encode, settings
from state.tx.models.combination_base import CombinationResponses, fit_lines
from state.tx.models.combination_parts import offsets_for
from state.utils.errors import StateError

COMB = Combinations(separator="+", control="ctrl")


def test_parts_drop_the_control_and_keep_order():
    assert COMB.parts("KLF1+ctrl") == ("KLF1",) and COMB.parts("ctrl") == () and COMB.parts("A") == ("A",)
    assert COMB.parts("B+A") == ("B", "A") and COMB.is_combination("A+B") and not COMB.is_combination("A+ctrl")
    assert Combinations(separator="_", control="NT").parts("A_B") == ("A", "B")


def test_settings_default_none_and_bad_mode_named():
    assert settings({}, {"control_pert": "ctrl"}) is None
    found = settings({"pert_combination": "additive"}, {"control_pert": "ctrl", "combination_separator": "|"})
    assert found == Combinations(separator="|", control="ctrl")
    with pytest.raises(StateError, match="pert_combination='sum'"):
        settings({"pert_combination": "sum"}, {})


def test_combination_is_the_sum_of_its_parts_one_hot_columns():
    mapping = combination_map(["ctrl", "A+ctrl", "B+ctrl", "A+B", "C+A"], COMB)
    assert len(mapping["ctrl"]) == 4  # parts A, B, C + the control's own column
    assert torch.equal(mapping["A+B"], mapping["A+ctrl"] + mapping["B+ctrl"])
    assert torch.equal(mapping["C+A"], mapping["C"] + mapping["A"])  # C is only ever part of a combination
    assert mapping["ctrl"].sum() == 1 and (mapping["ctrl"] * mapping["A"]).sum() == 0
    with pytest.raises(StateError, match="unknown perturbation part.*: Z"):
        encode(["A+Z"], COMB, vocabulary=["A", "B", "C", "ctrl"])


def test_combination_from_feature_rows():
    features = {"A": torch.tensor([1.0, 0.0, 2.0]), "B": torch.tensor([0.0, 3.0, 1.0]), "ctrl": torch.zeros(3),
                "A+B": torch.zeros(3)}  # cell-load zero-fills labels the file lacks
    mapping = combination_map(["ctrl", "A+ctrl", "A+B"], COMB, features=features)
    assert torch.equal(mapping["A+B"], torch.tensor([1.0, 3.0, 3.0]))
    assert torch.equal(mapping["A+ctrl"], features["A"])


def test_compose_an_unseen_combination_and_refuse_an_unknown_part_by_name():
    stored = {k: v.numpy() for k, v in combination_map(["ctrl", "A+ctrl", "B+ctrl", "C+ctrl"], COMB).items()}
    np.testing.assert_array_equal(compose("A+C", stored, COMB), stored["A"] + stored["C"])
    with pytest.raises(StateError, match="never saw: ZZZ"):
        compose("A+ZZZ", stored, COMB)


def test_perturb_mean_offset_of_an_unseen_combination_is_the_sum_of_its_parts():
    rng = np.random.default_rng(0)
    offsets = {"A+ctrl": rng.normal(size=5), "B+ctrl": rng.normal(size=5), "ctrl": np.zeros(5)}
    extra = offsets_for(["A+B", "A+ctrl", "ctrl"], offsets, COMB, cache={})
    assert set(extra) == {"A+B"}
    np.testing.assert_allclose(extra["A+B"], offsets["A+ctrl"] + offsets["B+ctrl"], rtol=1e-6)


def test_additive_base_and_parts_only_seen_in_combinations():
    rng = np.random.default_rng(1)
    a, b, c = (rng.normal(size=4) for _ in range(3))
    responses = {("K562", "A+ctrl"): a, ("K562", "B+ctrl"): b, ("K562", "A+B"): 0.5 * (a + b),
                 ("K562", "A+C"): a + c, ("K562", "B+C"): b + c}
    table = CombinationResponses(responses, 4, COMB)
    # a training combination's base is the sum of its parts' singles, never the combination itself
    np.testing.assert_allclose(table.elsewhere("K562", "A+B"), a + b, rtol=1e-5)
    # C was never a single: estimated from A+C and B+C (shrunk a little by the part ridge)
    np.testing.assert_allclose(table.elsewhere("K562", "C+B"), b + c * 2 / 3, rtol=1e-5)
    lines, _, combo_lines, _ = fit_lines(table, 1e-3)
    assert set(lines) == {"K562"} and set(combo_lines) == {"K562"}


def test_gears_split_groups_and_toml(tmp_path):
    singles = [f"G{i}+ctrl" for i in range(20)]
    doubles = [f"G{i}+G{j}" for i in range(20) for j in range(i + 1, 20)][:60]
    split = gears_split(["ctrl", *singles, *doubles], control="ctrl", seed=3)
    held_parts = {COMB.parts(s)[0] for s, g in split.group.items() if g == "unseen_single"}
    assert len(held_parts) == 3
    for label, group in split.group.items():
        if group.startswith("seen"):
            assert int(group[-1]) == sum(p not in held_parts for p in COMB.parts(label))
    assert not set(split.train) & set(split.test) and not set(split.val) & set(split.test)
    assert set(split.train) | set(split.val) | set(split.test) == {*singles, *doubles}
    toml = write_split_toml(tmp_path / "s.toml", split, dataset="d", data_path="x.h5ad", cell_type="K562")
    import tomllib

    parsed = tomllib.loads(toml.read_text())
    assert parsed["fewshot"]["d.K562"]["test"] == split.test and parsed["training"] == {"d": "train"}
