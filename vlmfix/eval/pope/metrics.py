"""POPE metrics with "yes" as the positive class."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from vlmfix.errors import DataError

__all__ = ["pope_metrics", "mean_f1", "POPE_METRIC_VERSION"]

logger = logging.getLogger(__name__)

#: Bumped whenever a metric definition changes.
POPE_METRIC_VERSION = "vlmfix-pope-1"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1, yes-ratio and confusion counts.

    Args:
        predictions: parsed answers, each "yes", "no" or "unknown".
        labels: gold labels, each "yes" or "no", aligned with ``predictions``.

    Returns:
        ``accuracy, precision, recall, f1, yes_ratio`` (fractions in [0, 1]) and
        ``tp, fp, tn, fn, unknown, count``. The yes-ratio is the share of *predictions*
        that are "yes" (not of labels). An "unknown" answer is never correct: it lowers
        accuracy and recall (when the label is yes) and is neither tp, fp, tn nor fn, so
        ``count = tp + fp + tn + fn + unknown``. Ratios with a zero denominator are 0.0.

    Raises:
        DataError: the two sequences differ in length, or hold values other than the
            ones above.

    Example:
        >>> pope_metrics(["yes", "no", "yes"], ["yes", "no", "no"])["precision"]
        0.5
    """
    if len(predictions) != len(labels):
        raise DataError(
            f"POPE metrics: {len(predictions)} answers for {len(labels)} questions; "
            "every question needs exactly one answer"
        )
    tp = fp = tn = fn = unknown = 0
    unknown_pos = 0
    for i, (p, y) in enumerate(zip(predictions, labels, strict=True)):
        if y not in ("yes", "no"):
            raise DataError(f"POPE metrics: label #{i} is {y!r}; expected 'yes' or 'no'")
        if p == "yes":
            tp += y == "yes"
            fp += y == "no"
        elif p == "no":
            fn += y == "yes"
            tn += y == "no"
        elif p == "unknown":
            unknown += 1
            unknown_pos += y == "yes"
        else:
            raise DataError(f"POPE metrics: answer #{i} is {p!r}; parse answers to 'yes'/'no'/'unknown' first")
    count = len(labels)
    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn + unknown_pos)
    return {
        "accuracy": _div(tp + tn, count),
        "precision": precision,
        "recall": recall,
        "f1": _div(2 * precision * recall, precision + recall),
        "yes_ratio": _div(tp + fp, count),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unknown": unknown,
        "count": count,
    }


def mean_f1(per_split: Mapping[str, Mapping[str, float]]) -> float:
    """Mean F1 over splits (what LLaVA reports for POPE); 0.0 for no splits."""
    if not per_split:
        return 0.0
    return sum(m["f1"] for m in per_split.values()) / len(per_split)


def _div(num: float, den: float) -> float:
    return num / den if den else 0.0
