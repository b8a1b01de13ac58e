"""The sweep's grid expansion, Pareto front and table (no model)."""

from __future__ import annotations

import pytest

from vlmfix.errors import ConfigError
from vlmfix.testbed.sweep import grid_points, markdown_table, pareto_front


def test_grid_is_baseline_default_then_product_without_repeating_the_default():
    pts = grid_points("var", ["tau=2,20", "p=0.3,0.6"])
    assert [p.kind for p in pts[:2]] == ["baseline", "default"]
    settings = [p.overrides for p in pts[2:]]
    # tau=20, p=0.6 is the paper default: already point 1, not run twice
    assert settings == [{"tau": 2, "p": 0.3}, {"tau": 2, "p": 0.6}, {"tau": 20, "p": 0.3}]
    assert pts[1].label == "default" and pts[0].label == "baseline" and pts[2].label == "tau=2,p=0.3"


@pytest.mark.parametrize(
    "grid, match",
    [
        (["taux=1,2"], "has no option 'taux'"),
        (["tau"], "KEY=V1,V2"),
        (["tau=1", "tau=2"], "given twice"),
        (["p=2"], "p"),  # outside [0, 1]: rejected before any generation
    ],
)
def test_bad_grids_fail_early(grid, match):
    with pytest.raises(ConfigError, match=match):
        grid_points("var", grid)


def test_unknown_method_suggests():
    with pytest.raises(ConfigError, match="vcd"):
        grid_points("vcdd", [])


def test_pareto_front():
    rows = [
        {"recall": 0.9, "chair_i": 0.3},  # front (best recall)
        {"recall": 0.8, "chair_i": 0.1},  # front
        {"recall": 0.7, "chair_i": 0.2},  # dominated by row 1
        {"recall": 0.8, "chair_i": 0.1},  # tie with row 1: neither dominates
    ]
    assert pareto_front(rows) == [True, True, False, True]


def test_table_marks_default_and_front():
    ci = {k: [0.0, 1.0] for k in ("chair_i", "chair_s", "recall", "pope_adv_f1", "pope_adv_acc", "pope_adv_yes_ratio")}
    row = dict(chair_i=0.1, chair_s=0.2, recall=0.9, length=5.0, pope_adv_f1=0.8, pope_adv_acc=0.8,
               pope_adv_yes_ratio=0.5, ci={**ci, "length": [4.0, 6.0]})  # fmt: skip
    rec = {"method": "var", "model_id": "m", "n": 3, "seed": 1, "rows": [
        {**row, "point": 0, "kind": "baseline", "label": "baseline", "pareto": False},
        {**row, "point": 1, "kind": "default", "label": "default", "pareto": True},
    ]}  # fmt: skip
    md = markdown_table(rec)
    assert "| 1 | default * | 10.0 [0.0, 100.0] |" in md
    assert "| 5.0 [4.0, 6.0] |" in md
    assert md.splitlines()[-1].endswith("| P |") and not md.splitlines()[-2].endswith("| P |")
