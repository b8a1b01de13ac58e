"""Seeded bootstrap intervals over images and the paired bootstrap of differences."""

from __future__ import annotations

import numpy as np
import pytest

from vlmfix.errors import ConfigError, DataError
from vlmfix.eval.bootstrap import BootstrapSpec, bootstrap_intervals, group_counts, paired_differences, safe_div
from vlmfix.eval.chair.scorer import chair_intervals, score_caption
from vlmfix.eval.pope.metrics import POPE_RATIOS, pope_intervals, pope_metrics


def rate(totals):
    return {"rate": safe_div(totals[:, 0], totals[:, 1])}


def test_seeded_and_recorded():
    rng = np.random.default_rng(5)
    counts = np.stack([rng.integers(0, 3, 200), np.full(200, 2)], axis=1)
    a = bootstrap_intervals(counts, rate, BootstrapSpec(n_resamples=300, seed=1))
    b = bootstrap_intervals(counts, rate, BootstrapSpec(n_resamples=300, seed=1))
    c = bootstrap_intervals(counts, rate, BootstrapSpec(n_resamples=300, seed=2))
    assert a == b and a != c
    point = counts[:, 0].sum() / counts[:, 1].sum()
    lo, hi = a["rate"]
    assert lo < point < hi and hi - lo < 0.15
    # the binomial standard error gives the width of a 95% interval to within ~25%
    se = np.sqrt(point * (1 - point) / counts[:, 1].sum())
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.35)
    spec = BootstrapSpec(n_resamples=300, seed=1).to_dict(n_units=200)
    assert spec == {"method": "percentile bootstrap", "unit": "image", "n_resamples": 300, "seed": 1,
                    "level": 0.95, "n_units": 200}  # fmt: skip


def test_identical_units_give_a_zero_width_interval_and_empty_input_is_safe():
    ci = bootstrap_intervals(np.tile([[1.0, 4.0]], (30, 1)), rate, BootstrapSpec(n_resamples=50))
    assert ci["rate"] == pytest.approx([0.25, 0.25])
    assert bootstrap_intervals(np.zeros((0, 2)), rate) == {"rate": [0.0, 0.0]}


@pytest.mark.parametrize("kwargs", [{"n_resamples": 0}, {"n_resamples": 1.5}, {"level": 1.0}, {"level": 0}])
def test_spec_validation(kwargs):
    with pytest.raises(ConfigError):
        BootstrapSpec(**kwargs)


def test_group_counts_sums_by_unit_in_first_seen_order():
    units, counts = group_counts([("b", 1), ("a", 2), ("b", 3)], lambda x: x[0], lambda x: [x[1], 1])
    assert units == ["b", "a"] and counts.tolist() == [[4, 2], [2, 1]]


def test_paired_differences():
    rng = np.random.default_rng(0)
    trials = np.full(300, 6)
    a = np.stack([rng.binomial(6, 0.5, 300), trials], axis=1)
    same = paired_differences(range(300), a, range(300), a, rate, BootstrapSpec(n_resamples=200))
    assert same["metrics"]["rate"]["diff"] == 0 and same["metrics"]["rate"]["ci"] == [0.0, 0.0]
    assert same["metrics"]["rate"]["outside"] is False and same["n_shared_units"] == 300
    # B gets one more hit on a third of the images: a small but consistent improvement
    b = a.copy()
    b[::3, 0] = np.minimum(b[::3, 0] + 1, 6)
    better = paired_differences(range(300), a, range(300), b, rate, BootstrapSpec(n_resamples=200))
    d = better["metrics"]["rate"]
    assert d["diff"] > 0 and d["ci"][0] > 0 and d["outside"] is True
    # pure noise: B's hits are an independent draw of the same rate
    c = np.stack([rng.binomial(6, 0.5, 300), trials], axis=1)
    noise = paired_differences(range(300), a, range(300), c, rate, BootstrapSpec(n_resamples=200))
    lo, hi = noise["metrics"]["rate"]["ci"]
    assert lo <= noise["metrics"]["rate"]["diff"] <= hi
    # only shared units are paired
    part = paired_differences(range(300), a, range(100, 400), np.vstack([b[100:], b[:100]]), rate)
    assert (part["n_shared_units"], part["n_only_a"], part["n_only_b"]) == (200, 100, 100)
    with pytest.raises(DataError, match="share no image"):
        paired_differences([1, 2], a[:2], [3, 4], a[:2], rate)


def test_pope_intervals_cover_every_ratio_and_resample_images():
    recs = []
    for img in range(40):
        for split in ("random", "popular"):
            for j, label in enumerate(["yes", "yes", "no", "no"]):
                pred = label if (img + j) % 4 else ("no" if label == "yes" else "yes")
                recs.append({"split": split, "image": f"{img}.jpg", "label": label, "pred": pred})
    per_split, mean_ci, n_images = pope_intervals(recs, ["random", "popular"], BootstrapSpec(n_resamples=200))
    assert n_images == 40 and set(per_split) == {"random", "popular"}
    random_recs = [r for r in recs if r["split"] == "random"]
    point = pope_metrics([r["pred"] for r in random_recs], [r["label"] for r in random_recs])
    for m in POPE_RATIOS:
        lo, hi = per_split["random"][m]
        assert lo <= point[m] <= hi
    assert mean_ci[0] <= point["f1"] <= mean_ci[1]


def test_chair_intervals_group_captions_of_one_image():
    recs = [
        {"image_id": i // 2, **score_caption("A dog and a cat." if i % 3 else "A dog.", ["dog"]).to_dict()}
        for i in range(60)
    ]
    ci, n_images = chair_intervals(recs, BootstrapSpec(n_resamples=100))
    assert n_images == 30 and set(ci) == {"CHAIR_s", "CHAIR_i", "Recall", "Len"}
    assert ci["Recall"] == [1.0, 1.0] and ci["CHAIR_s"][0] < 2 / 3 < ci["CHAIR_s"][1]
