"""Results-table intervals: partner counts, paired differences vs baseline, the reading."""

from __future__ import annotations

import numpy as np
import pytest

from vlmfix.testbed import intervals
from vlmfix.testbed.results import markdown_table, partner_stats


def test_partner_counts_match_partner_stats():
    objects = {1: {"fork"}, 2: {"fork", "knife"}, 3: {"dog", "tv"}, 4: {"toilet"}}
    captions = {1: "a fork and a knife.", 2: "a fork and a knife.", 3: "a frisbee and a dog and a tv.", 4: "a sink."}
    ids, counts = intervals.partner_counts(captions, objects)
    assert ids == [1, 2, 3, 4]
    assert counts.tolist() == [[1, 1], [0, 0], [2, 1], [1, 1]]
    assert counts[:, 1].sum() / counts[:, 0].sum() == pytest.approx(partner_stats(captions, objects)["rate"])
    lo, hi = intervals.partner_interval((ids, counts))
    assert 0 <= lo <= 0.75 <= hi <= 1


def _partner(rates):
    ids = list(range(len(rates)))
    return ids, np.array([[1, r] for r in rates], dtype=float), intervals._partner_fn


def test_paired_vs_baseline_calls_only_real_improvements():
    base = {"partner": _partner([1] * 40)}
    fixed = {"partner": _partner([0] * 40)}
    same = {"partner": _partner([1] * 39 + [0])}
    got = intervals.paired_vs_baseline(base, fixed)["partner_rate"]
    assert got["diff"] == -1.0 and got["outside"] and got["better"]
    got = intervals.paired_vs_baseline(base, same)["partner_rate"]
    assert not got["better"]
    worse = intervals.paired_vs_baseline(fixed, base)["partner_rate"]
    assert worse["outside"] and not worse["better"]
    rows = [
        {"variant": "v", "method": "m", "vs_baseline": intervals.paired_vs_baseline(base, fixed)},
        {"variant": "v", "method": "w", "vs_baseline": intervals.paired_vs_baseline(fixed, base)},
    ]
    text = intervals.reading(rows)
    assert "`v` / `m`: the prior partner named less often (-100.0 pts)." in text
    assert "no difference outside" in text and "worse: partner_rate +100.0 pts" in text


def test_table_cells_show_intervals_when_present():
    keys = ["pope_random_acc", "pope_random_f1", "pope_adversarial_acc", "pope_adversarial_f1", "chair_s_natural",
            "chair_i_natural", "chair_s_adversarial", "chair_i_adversarial", "recall_adversarial", "partner_rate",
            "partner_after_a", "partner_before_a", "partner_a_unnamed"]  # fmt: skip
    row = {"variant": "v", "method": "m", **dict.fromkeys(keys, 0.5), "ci": {"partner_rate": [0.25, 0.75]}}
    md = markdown_table([row])
    assert "| 50.0 [25.0, 75.0] |" in md and md.count("[") == 1
