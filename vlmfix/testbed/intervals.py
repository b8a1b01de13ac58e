"""Bootstrap intervals and paired method-vs-baseline differences for the results table.

:mod:`.results` runs every method on the same held-out scenes; this module turns each run's
per-sample records (``samples.jsonl`` of :func:`vlmfix.eval.pope.run_pope` and
:func:`vlmfix.eval.chair.run_chair`) into per-image count matrices, and compares each
method with the baseline by a **paired** bootstrap over images
(:func:`vlmfix.eval.bootstrap.paired_differences`): a difference is called real only when
its 95% interval excludes 0. The evaluators' own intervals (same module, same seed) are
what the table prints beside every metric; partner-hallucination gets one here.

The reading (:func:`reading`) names the mechanism a method acts on, from those paired
differences only: less partner hallucination in captions (CHAIR_i / partner rate) means
the method weakened the text prior's hold on the caption; a higher POPE-adversarial F1
means yes/no answers moved toward the image.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["partner_counts", "unit_counts", "paired_vs_baseline", "interval_cell", "reading"]

#: (row key, source, metric name in the source's metric_fn, higher is better)
COMPARED = (
    ("chair_i_adversarial", "chair_adversarial", "CHAIR_i", False),
    ("recall_adversarial", "chair_adversarial", "Recall", True),
    ("partner_rate", "partner", "rate", False),
    ("pope_adversarial_f1", "pope_adversarial", "adversarial/f1", True),
    ("pope_random_f1", "pope_random", "random/f1", True),
)


def partner_counts(captions: dict[int, str], objects: dict[int, set[str]]) -> tuple[list, np.ndarray]:
    """Per image: ``[partner instances, partners named]`` (definitions of :func:`.results.partner_stats`)."""
    from vlmfix.testbed import catalog as cat

    ids, rows = [], []
    for image_id, text in captions.items():
        words = set(re.findall(r"[a-z]+", text.lower()))
        present = objects.get(image_id, set())
        inst = [b for a, b in cat.PAIRS if a in present and b not in present]
        ids.append(image_id)
        rows.append([len(inst), sum(b in words for b in inst)])
    return ids, np.asarray(rows, dtype=float).reshape(-1, 2)


def _partner_fn(t: np.ndarray) -> dict[str, np.ndarray]:
    from vlmfix.eval.bootstrap import safe_div

    return {"rate": safe_div(t[:, 1], t[:, 0])}


def unit_counts(source: str, folder: Path, partner: tuple[list, np.ndarray] | None = None):
    """``(image ids, counts, metric_fn)`` of one run folder (``source``: a :data:`COMPARED` source)."""
    from vlmfix.eval.chair.scorer import chair_metric_fn, chair_unit_counts
    from vlmfix.eval.pope.metrics import pope_metric_fn, pope_unit_counts
    from vlmfix.io import read_jsonl

    if source == "partner":
        ids, counts = partner
        return ids, counts, _partner_fn
    records = list(read_jsonl(Path(folder) / "samples.jsonl"))
    if source.startswith("pope_"):
        split = source[len("pope_") :]
        ids, counts = pope_unit_counts(records, [split])
        return ids, counts, pope_metric_fn([split])
    ids, counts = chair_unit_counts(records)
    return ids, counts, chair_metric_fn


def partner_interval(partner: tuple[list, np.ndarray], spec=None) -> list[float]:
    """Bootstrap 95% interval of the partner rate over images."""
    from vlmfix.eval.bootstrap import bootstrap_intervals

    return bootstrap_intervals(partner[1], _partner_fn, spec)["rate"]


def paired_vs_baseline(base: dict[str, tuple], other: dict[str, tuple], spec=None) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of ``other - base`` for every :data:`COMPARED` metric.

    Args:
        base, other: source -> ``(image ids, counts, metric_fn)`` of two runs on the same images.

    Returns:
        row key -> ``{"diff", "ci", "outside", "better"}`` (``better``: the difference is
        outside its interval and in the good direction).
    """
    from vlmfix.eval.bootstrap import paired_differences

    out = {}
    for key, source, metric, higher in COMPARED:
        if source not in base or source not in other:
            continue
        ids_a, ca, fn = base[source]
        ids_b, cb, _ = other[source]
        d = paired_differences(ids_a, ca, ids_b, cb, fn, spec)["metrics"][metric]
        out[key] = {
            "diff": d["diff"],
            "ci": d["ci"],
            "outside": d["outside"],
            "better": d["outside"] and ((d["diff"] > 0) == higher),
        }
    return out


def interval_cell(row: dict[str, Any], key: str) -> str:
    """``"12.3 [10.1, 14.0]"`` (percent) when the row has an interval for ``key``, else ``"12.3"``."""
    s = f"{100 * row[key]:.1f}"
    ci = (row.get("ci") or {}).get(key)
    return s + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


_MECHANISM = {
    "chair_i_adversarial": "fewer hallucinated objects in captions",
    "partner_rate": "the prior partner named less often",
    "recall_adversarial": "more real objects named",
    "pope_adversarial_f1": "yes/no answers follow the image against the prior",
    "pope_random_f1": "yes/no answers on ordinary questions",
}


def reading(rows: list[dict[str, Any]]) -> str:
    """One line per (variant, method): which paired differences vs its reference are real
    (the baseline; for beam rows the baseline of the same beam width, named in the line)."""
    from vlmfix.testbed.results import row_label

    lines = []
    for r in rows:
        vs = r.get("vs_baseline")
        if not vs:
            continue
        good = [f"{_MECHANISM[k]} ({100 * v['diff']:+.1f} pts)" for k, v in vs.items() if v["better"]]
        bad = [f"{k} {100 * v['diff']:+.1f} pts" for k, v in vs.items() if v["outside"] and not v["better"]]
        text = "; ".join(good) if good else "no difference outside the paired 95% interval"
        if bad:
            text += f"; worse: {', '.join(bad)}"
        ref = r.get("vs_reference", "baseline")
        against = "" if ref == "baseline" else f" (vs `{row_label({'method': ref})}`)"
        lines.append(f"- `{r['variant']}` / `{row_label(r)}`{against}: {text}.")
    return "\n".join(lines)
