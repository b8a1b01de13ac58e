"""The results table's own scoring: partner statistics and method specs."""

from __future__ import annotations

import pytest

from vlmfix.errors import ConfigError
from vlmfix.testbed.results import (
    markdown_table,
    parse_method_spec,
    parse_row_spec,
    partner_stats,
    reference_spec,
    row_label,
)


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


def test_row_specs_take_a_beam_suffix():
    assert parse_row_spec("baseline") == ("baseline", 1)
    assert parse_row_spec("var:tau=5,p=0.5") == ("var:tau=5,p=0.5", 1)
    assert parse_row_spec("baseline@beam5") == ("baseline", 5)
    assert parse_row_spec("pai+vcd@beam3") == ("pai+vcd", 3)
    for bad in ("vcd@beam1", "vcd@beam", "vcd@greedy", "@beam5", "vcd@beam5x"):
        with pytest.raises(ConfigError, match="@beamN"):
            parse_row_spec(bad)
    assert reference_spec("baseline") is None
    assert reference_spec("baseline@beam5") == "baseline"
    assert reference_spec("vcd") == "baseline"
    assert reference_spec("helpd@beam5") == "baseline@beam5"


def test_beam_rows_are_labelled_in_the_table_and_the_reading():
    from vlmfix.testbed.intervals import reading

    assert row_label({"method": "baseline@beam5", "num_beams": 5}) == "baseline (beam 5)"
    assert row_label({"method": "var:tau=2"}) == "var:tau=2"  # rows written before num_beams existed
    row = dict.fromkeys(
        ["pope_random_acc", "pope_random_f1", "pope_adversarial_acc", "pope_adversarial_f1", "chair_s_natural",
         "chair_i_natural", "chair_s_adversarial", "chair_i_adversarial", "recall_adversarial", "partner_rate",
         "partner_after_a", "partner_before_a", "partner_a_unnamed"], 0.5,
    )  # fmt: skip
    table = markdown_table([{**row, "variant": "clean", "method": "helpd@beam5", "num_beams": 5}])
    assert table.splitlines()[2].startswith("| clean | helpd (beam 5) | 50.0")
    vs = {"partner_rate": {"diff": -0.5, "ci": [-0.6, -0.4], "outside": True, "better": True}}
    text = reading([{"variant": "clean", "method": "helpd@beam5", "vs_baseline": vs, "vs_reference": "baseline@beam5"}])
    assert text.startswith("- `clean` / `helpd (beam 5)` (vs `baseline (beam 5)`): the prior partner")


def test_evaluate_decodes_pope_and_captions_with_the_rows_beams(tmp_path, monkeypatch):
    """A beam row passes num_beams to every generate call (short POPE answers and captions)
    and is compared with the baseline of the same beam width."""
    from types import SimpleNamespace

    import vlmfix
    from vlmfix.testbed import results

    calls = []

    def fake_generate(model, processor, images, prompts, methods, **kwargs):
        calls.append((tuple(c.name for c in methods), kwargs["num_beams"], kwargs["max_new_tokens"]))
        return SimpleNamespace(texts=["yes" if p.startswith("is there") else "a fork and a knife." for p in prompts])

    monkeypatch.setattr(vlmfix, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(vlmfix, "generate", fake_generate)
    splits = results._write_splits(tmp_path / "scenes", 8, 1)
    specs = ["baseline", "baseline@beam5", "vcd@beam5"]
    rows = results.evaluate("clean", specs, splits, tmp_path / "runs", n=8, seed=1)
    assert {(names, beams, t) for names, beams, t in calls} == {
        ((), 1, 4), ((), 1, 24), ((), 5, 4), ((), 5, 24), (("vcd",), 5, 4), (("vcd",), 5, 24),
    }  # fmt: skip
    assert [r["num_beams"] for r in rows] == [1, 5, 5]
    assert [r.get("vs_reference") for r in rows] == [None, "baseline", "baseline@beam5"]


def test_evaluate_under_another_prompt_tags_its_rows(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import vlmfix
    from vlmfix.testbed import results

    prompts_seen = set()

    def fake_generate(model, processor, images, prompts, methods, **kwargs):
        prompts_seen.update(p for p in prompts if not p.lower().startswith("is there"))
        return SimpleNamespace(texts=["yes" if p.startswith("is there") else "a fork and a knife." for p in prompts])

    monkeypatch.setattr(vlmfix, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(vlmfix, "generate", fake_generate)
    splits = results._write_splits(tmp_path / "scenes", 8, 1)
    rows = results.evaluate("clean", ["baseline", "vcd"], splits, tmp_path / "runs", n=8, seed=1,
                            prompt="answer . describe the image.", tag="distracted")  # fmt: skip
    assert prompts_seen == {"answer . describe the image."}  # the captions, and only them
    assert [r["variant"] for r in rows] == ["clean [distracted]"] * 2
    assert all(r["prompt"] == "answer . describe the image." for r in rows)
    assert rows[1]["vs_reference"] == "baseline"  # paired within the tagged run


def test_cli_prompt_needs_a_tag(capsys):
    from vlmfix.testbed import results

    with pytest.raises(SystemExit):
        results.main(["--prompt", "answer . describe the image.", "--n", "3"])
    assert "--tag" in capsys.readouterr().err
