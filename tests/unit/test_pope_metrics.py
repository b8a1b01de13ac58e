"""POPE metrics: hand-computed values, yes-ratio from predictions, edge cases."""

from __future__ import annotations

import pytest

from vlmfix.errors import DataError
from vlmfix.eval.pope import mean_f1, pope_metrics


def test_hand_computed():
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    m = pope_metrics(preds, labels)
    # tp=2 (0,4) fp=1 (1) fn=1 (2) tn=2 (3,5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["count"]) == (2, 1, 2, 1, 6)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_asymmetric_case_tells_every_metric_apart():
    # 4 yes / 2 no labels; tp=2 fn=2 fp=1 tn=1: precision != recall != f1 != accuracy, and
    # the yes-ratio of the predictions (3/6) differs from that of the labels (4/6)
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "yes", "yes", "yes", "no", "no"]
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3)  # tp / (tp + fp): a swap with recall fails
    assert m["recall"] == pytest.approx(1 / 2)  # tp / (tp + fn)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["yes_ratio"] == pytest.approx(3 / 6)  # from predictions, not the labels' 4/6
    swapped = pope_metrics(labels, preds)  # predictions and labels are not interchangeable
    assert (swapped["precision"], swapped["recall"]) == (pytest.approx(1 / 2), pytest.approx(2 / 3))
    assert swapped["yes_ratio"] == pytest.approx(4 / 6)


def test_yes_ratio_counts_predictions_not_labels():
    # labels are half yes; predictions are all yes -> yes-ratio 1.0 (lmms-eval reported 0.5)
    m = pope_metrics(["yes"] * 4, ["yes", "yes", "no", "no"])
    assert m["yes_ratio"] == 1.0
    assert m["precision"] == 0.5 and m["recall"] == 1.0


def test_zero_division_is_safe():
    m = pope_metrics(["no", "no"], ["no", "no"])  # no positive predictions, no positive labels
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == 1.0
    empty = pope_metrics([], [])
    assert empty["count"] == 0 and empty["accuracy"] == 0.0


def test_unknown_answers_are_never_correct():
    m = pope_metrics(["unknown", "unknown", "yes"], ["yes", "no", "yes"])
    assert m["unknown"] == 2
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] + m["unknown"] == m["count"] == 3
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)  # the unknown on a "yes" label is a miss
    assert m["precision"] == 1.0


def test_mismatched_counts_raise():
    with pytest.raises(DataError, match="2 answers for 3 questions"):
        pope_metrics(["yes", "no"], ["yes", "no", "yes"])


def test_bad_values_raise():
    with pytest.raises(DataError, match="answer #0"):
        pope_metrics(["Yes"], ["yes"])
    with pytest.raises(DataError, match="label #0"):
        pope_metrics(["yes"], ["maybe"])


def test_mean_f1():
    assert mean_f1({"a": {"f1": 0.5}, "b": {"f1": 1.0}}) == pytest.approx(0.75)
    assert mean_f1({}) == 0.0
