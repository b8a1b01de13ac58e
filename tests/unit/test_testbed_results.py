"""The results table's own scoring: partner statistics and method specs."""

from __future__ import annotations

import pytest

from vlmfix.errors import ConfigError
from vlmfix.testbed.results import markdown_table, parse_method_spec, partner_stats


def test_partner_stats_counts_instances_and_positions():
    objects = {
        1: {"fork"},  # partner knife absent
        2: {"fork", "knife"},  # partner present: no instance
        3: {"dog", "tv"},  # frisbee and remote absent: two instances
        4: {"toilet"},  # sink absent
    }
    captions = {
        1: "a fork and a knife.",  # after A
        2: "a fork and a knife.",
        3: "a frisbee and a dog and a tv.",  # frisbee before dog; remote not named
        4: "a sink.",  # A unnamed
    }
    got = partner_stats(captions, objects)
    assert got["instances"] == 4
    assert got["rate"] == pytest.approx(3 / 4)
    assert got["after_a"] == pytest.approx(1 / 3)
    assert got["before_a"] == pytest.approx(1 / 3)
    assert got["a_unnamed"] == pytest.approx(1 / 3)


def test_partner_stats_without_instances_is_zero_not_nan():
    assert partner_stats({1: "a cup."}, {1: {"cup"}}) == {
        "instances": 0, "rate": 0.0, "after_a": 0.0, "before_a": 0.0, "a_unnamed": 0.0,
    }  # fmt: skip


def test_method_specs():
    assert parse_method_spec("baseline") == []
    (var,) = parse_method_spec("var:tau=5,p=0.5")
    assert var.tau == 5 and var.p == 0.5
    assert [c.name for c in parse_method_spec("pai+vcd")] == ["pai", "vcd"]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_method_spec("var:tau")
    with pytest.raises(ConfigError, match="unknown method"):
        parse_method_spec("nope")


def test_markdown_table_has_one_row_per_result():
    row = dict.fromkeys(
        ["pope_random_acc", "pope_random_f1", "pope_adversarial_acc", "pope_adversarial_f1", "chair_s_natural",
         "chair_i_natural", "chair_s_adversarial", "chair_i_adversarial", "recall_adversarial", "partner_rate",
         "partner_after_a", "partner_before_a", "partner_a_unnamed"], 0.5,
    )  # fmt: skip
    table = markdown_table([{**row, "variant": "clean", "method": "baseline"}, {**row, "variant": "x", "method": "m"}])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| clean | baseline | 50.0")
