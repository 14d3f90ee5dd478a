"""GEARS' splits of a combinatorial screen, written as a cell-load TOML (``state.api.combination_split``).

Held-out combinations fall in three groups by how many of their parts were seen as singles in
training (Roohani et al. 2023): ``seen2`` (both), ``seen1`` (one), ``seen0`` (none). The split holds
out a share of the singles (their labels are test perturbations too, ``unseen_single``); every
combination with a held-out part is then a test ``seen1`` / ``seen0`` combination, and a share of the
remaining combinations (``seen2``) is held out as well. A few ``seen2`` combinations go to ``val``
(what ``state_plus``'s gate judges its correction on). The TOML is cell-load's few-shot form: one
``[fewshot."dataset.cell_type"]`` table per cell line; everything else trains.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from state.tx.combinations import DEFAULT_SEPARATOR, Combinations
from state.utils.errors import StateError

GROUPS = ("seen2", "seen1", "seen0", "unseen_single")


@dataclass
class CombinationSplit:
    train: list[str]
    val: list[str]
    test: list[str]
    group: dict[str, str] = field(default_factory=dict)  # held-out label -> one of GROUPS

    def by_group(self) -> dict[str, list[str]]:
        return {g: sorted(lab for lab, k in self.group.items() if k == g) for g in GROUPS}


def gears_split(labels: Iterable[str], *, control: str, separator: str = DEFAULT_SEPARATOR, seed: int = 0,
                test_single_share: float = 0.15, test_combination_share: float = 0.25,
                val_share: float = 0.08) -> CombinationSplit:
    """Split perturbation ``labels`` (control excluded) as GEARS does; see the module docstring."""
    for name, share in (("test_single_share", test_single_share), ("test_combination_share", test_combination_share),
                        ("val_share", val_share)):
        if not 0.0 <= share < 1.0:
            raise StateError(f"{name}={share!r} is not a share", hint=f"use a number in [0, 1) for {name}")
    comb = Combinations(separator=separator, control=str(control))
    labels = sorted({str(x) for x in labels} - {comb.control})
    singles = [lab for lab in labels if len(comb.parts(lab)) == 1]
    combos = [lab for lab in labels if len(comb.parts(lab)) >= 2]
    if not combos:
        raise StateError(f"no combination labels (parts joined by '{separator}') among {len(labels)} perturbations",
                         hint="check the separator (data.kwargs.combination_separator) and the perturbation column")
    rng = np.random.default_rng(seed)
    parts_of_singles = sorted({comb.parts(lab)[0] for lab in singles})
    held_parts = set(rng.permutation(parts_of_singles)[: round(test_single_share * len(parts_of_singles))].tolist())
    seen_parts = set(parts_of_singles) - held_parts
    group: dict[str, str] = {lab: "unseen_single" for lab in singles if comb.parts(lab)[0] in held_parts}
    both_seen = []
    for lab in combos:
        n_seen = sum(p in seen_parts for p in comb.parts(lab))
        if n_seen == len(comb.parts(lab)):
            both_seen.append(lab)
        else:
            group[lab] = "seen1" if n_seen >= 1 else "seen0"
    order = rng.permutation(both_seen).tolist()
    n_test, n_val = round(test_combination_share * len(order)), round(val_share * len(order))
    group.update({lab: "seen2" for lab in order[:n_test]})
    val = sorted(order[n_test:n_test + n_val])
    test = sorted(group)
    held = set(test) | set(val)
    return CombinationSplit(train=[lab for lab in labels if lab not in held], val=val, test=test, group=group)


def write_split_toml(path: str | os.PathLike, split: CombinationSplit, *, dataset: str, data_path: str | os.PathLike,
                     cell_type: str) -> Path:
    """The split as a cell-load TOML (few-shot table of ``cell_type``); returns its path (atomic write)."""
    from state.io.atomic import atomic_write_text

    q = json.dumps  # a JSON string is a valid TOML basic string
    lines = ["[datasets]", f"{q(dataset)} = {q(str(data_path))}", "", "[training]", f'{q(dataset)} = "train"', "",
             f"[fewshot.{q(f'{dataset}.{cell_type}')}]",
             f"val = [{', '.join(map(q, split.val))}]", f"test = [{', '.join(map(q, split.test))}]", ""]
    return atomic_write_text(Path(path), "\n".join(lines))
