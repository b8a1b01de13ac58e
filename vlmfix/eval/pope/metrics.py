"""POPE metrics with "yes" as the positive class."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmfix.errors import DataError
from vlmfix.eval.bootstrap import BootstrapSpec, bootstrap_intervals, group_counts, safe_div

__all__ = [
    "pope_metrics",
    "mean_f1",
    "POPE_METRIC_VERSION",
    "POPE_RATIOS",
    "pope_unit_counts",
    "pope_metric_fn",
    "pope_intervals",
]

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


#: The ratio metrics that carry a bootstrap interval.
POPE_RATIOS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
# per-sample count vector: tp, fp, tn, fn, unknown, unknown with label yes, count
_N_COUNTS = 7


def _count_vector(pred: str, label: str) -> list[int]:
    return [
        pred == "yes" and label == "yes",
        pred == "yes" and label == "no",
        pred == "no" and label == "no",
        pred == "no" and label == "yes",
        pred == "unknown",
        pred == "unknown" and label == "yes",
        1,
    ]


def pope_unit_counts(records: Sequence[Mapping[str, Any]], splits: Sequence[str]) -> tuple[list, np.ndarray]:
    """Per-image POPE counts for the bootstrap.

    Args:
        records: per-sample records with ``split``, ``image``, ``pred`` and ``label``
            (error records are skipped).
        splits: split names, fixing the column order.

    Returns:
        ``(images, counts)`` with ``counts`` of shape ``[images, len(splits) * 7]``: for
        each split ``tp, fp, tn, fn, unknown, unknown_yes, count`` of that image's questions.
        An image is one unit across splits (the COCO splits ask about the same 500 images),
        so ``mean_f1``'s interval resamples images, not questions.
    """
    col = {s: i for i, s in enumerate(splits)}

    def counts_of(r):
        vec = [0] * (_N_COUNTS * len(splits))
        start = _N_COUNTS * col[r["split"]]
        vec[start : start + _N_COUNTS] = _count_vector(r["pred"], r["label"])
        return vec

    ok = [r for r in records if "error" not in r and r.get("split") in col]
    return group_counts(ok, lambda r: r["image"], counts_of)


def pope_metric_fn(splits: Sequence[str]):
    """Vectorised POPE metrics for :mod:`vlmfix.eval.bootstrap`: ``[R, S*7]`` totals ->
    ``{"<split>/<metric>": [R], "mean_f1": [R]}`` with the definitions of :func:`pope_metrics`."""

    def fn(totals: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        f1s = []
        for i, split in enumerate(splits):
            tp, fp, tn, fn_, _unk, unk_yes, count = (totals[:, _N_COUNTS * i + j] for j in range(_N_COUNTS))
            precision = safe_div(tp, tp + fp)
            recall = safe_div(tp, tp + fn_ + unk_yes)
            f1 = safe_div(2 * precision * recall, precision + recall)
            out[f"{split}/accuracy"] = safe_div(tp + tn, count)
            out[f"{split}/precision"] = precision
            out[f"{split}/recall"] = recall
            out[f"{split}/f1"] = f1
            out[f"{split}/yes_ratio"] = safe_div(tp + fp, count)
            f1s.append(f1)
        out["mean_f1"] = np.mean(f1s, axis=0) if f1s else np.zeros(totals.shape[0])
        return out

    return fn


def pope_intervals(
    records: Sequence[Mapping[str, Any]], splits: Sequence[str], spec: BootstrapSpec | None = None
) -> tuple[dict[str, dict[str, list[float]]], list[float], int]:
    """Bootstrap 95% intervals of every POPE ratio metric, resampling images.

    Returns:
        ``(per_split, mean_f1_interval, n_images)`` where ``per_split[split][metric]`` is
        ``[low, high]`` as fractions.
    """
    splits = list(splits)
    images, counts = pope_unit_counts(records, splits)
    if not images:
        counts = np.zeros((0, _N_COUNTS * len(splits)))
    ci = bootstrap_intervals(counts, pope_metric_fn(splits), spec)
    per_split = {s: {m: ci[f"{s}/{m}"] for m in POPE_RATIOS} for s in splits}
    return per_split, ci["mean_f1"], len(images)


def _div(num: float, den: float) -> float:
    return num / den if den else 0.0
