"""Results files, Markdown reports, plots and the CHAIR caption page.

A run folder holds ``samples.jsonl`` (one record per sample), ``results.json`` (the
self-describing summary), ``report.md`` with a metric table and ``metrics.png``, and
for CHAIR ``captions.html`` with hallucinated objects highlighted.
:func:`compare_runs` puts several run folders into one table and plot.
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vlmfix.errors import DataError
from vlmfix.eval.bootstrap import BootstrapSpec, paired_differences
from vlmfix.io import read_json, read_jsonl

__all__ = [
    "write_results",
    "load_results",
    "write_report",
    "plot_runs",
    "captions_html",
    "compare_runs",
    "paired_comparison",
    "run_label",
]

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
_POPE_COLS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_POPE_COUNTS = ("tp", "fp", "tn", "fn", "unknown", "count", "n_errors")
_CHAIR_COLS = ("CHAIR_s", "CHAIR_i", "Recall")
_CHAIR_COUNTS = ("Len", "n_captions", "n_empty_captions", "n_mentions", "n_hallucinated_mentions", "n_errors")


def write_results(out_dir: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically (a crash never leaves a half-written file)."""
    path = Path(out_dir) / RESULTS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a run folder's ``results.json``."""
    return read_json(
        Path(run_dir) / RESULTS_FILE, missing=f"{run_dir}: no {RESULTS_FILE}; is this a vlmfix eval output folder?"
    )


def run_label(results: dict[str, Any], fallback: str = "run") -> str:
    """A short name for a run: its label, else model id plus method names."""
    if results.get("label"):
        return str(results["label"])
    methods = [m.get("name", "?") if isinstance(m, dict) else str(m) for m in results.get("methods", [])]
    model = results.get("model_id") or fallback
    return f"{model} [{'+'.join(methods) or 'baseline'}]"


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}" if isinstance(x, int | float) else "-"


def _pct_ci(x: Any, ci: Any) -> str:
    """``45.4 [41.0, 49.8]`` (×100) when an interval is known, else the point value."""
    if isinstance(ci, list | tuple) and len(ci) == 2 and isinstance(x, int | float):
        return f"{100 * x:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return _pct(x)


def _num_ci(x: Any, ci: Any) -> str:
    if isinstance(ci, list | tuple) and len(ci) == 2 and isinstance(x, int | float):
        return f"{x:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"
    return _num(x)


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.1f}"
    return "-" if x is None else str(x)


def _table(results: dict[str, Any], label: str | None = None) -> list[str]:
    """Markdown table rows for one run (with a leading run column when ``label``)."""
    lead = ["run"] if label is not None else []
    first = [label] if label is not None else []
    if results.get("task") == "pope":
        head = [*lead, "split", *(c.replace("_", "-") + " %" for c in _POPE_COLS), *_POPE_COUNTS]
        rows = [
            [
                *first,
                split,
                *(_pct_ci(m.get(c), m.get("ci", {}).get(c)) for c in _POPE_COLS),
                *(_num(m.get(c)) for c in _POPE_COUNTS),
            ]
            for split, m in results.get("splits", {}).items()
        ]
        mean = _pct_ci(results.get("mean_f1"), results.get("mean_f1_ci"))
        rows.append([*first, "**mean F1**", "", "", "", mean, "", *[""] * len(_POPE_COUNTS)])
    else:
        m = results.get("metrics", {})
        ci = m.get("ci", {})
        head = [*lead, *(c.replace("_", "\\_") + " %" for c in _CHAIR_COLS), *_CHAIR_COUNTS]
        rows = [
            [
                *first,
                *(_pct_ci(m.get(c), ci.get(c)) for c in _CHAIR_COLS),
                *(_num_ci(m.get(c), ci.get(c)) if c == "Len" else _num(m.get(c)) for c in _CHAIR_COUNTS),
            ]
        ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def write_report(out_dir: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write ``report.md`` and ``metrics.png`` for one run folder."""
    out = Path(out_dir)
    plot = plot_runs([(run_label(results, out.name), results)], out / "metrics.png")
    lines = [f"# {results.get('task', 'eval').upper()} — {run_label(results, out.name)}", ""]
    if results.get("n_errors"):
        lines += [
            f"**Warning: {results['n_errors']} samples failed** (see `error` in samples.jsonl); "
            "the metrics below cover only the samples that succeeded.",
            "",
        ]
    n_empty = results.get("metrics", {}).get("n_empty_captions")
    if n_empty:
        lines += [
            f"**{n_empty} empty captions** are counted as captions without mentions (see `empty` in samples.jsonl).",
            "",
        ]
    lines += _table(results)
    boot = results.get("bootstrap")
    if boot:
        lines += [
            "",
            f"[brackets]: {100 * boot.get('level', 0.95):.0f}% {boot.get('method', 'bootstrap')} interval over "
            f"{boot.get('n_units', '?')} images ({boot.get('n_resamples')} resamples, seed {boot.get('seed')}).",
        ]
    lines += ["", f"![metrics]({plot.name})", "", "## Settings", ""]
    for key in ("model_id", "template", "parser", "normalizer", "metric_version", "seed", "generation"):
        if key in results:
            lines.append(f"- **{key}**: `{json.dumps(results[key], default=str)}`")
    methods = results.get("methods") or []
    lines.append(f"- **methods**: `{json.dumps(methods, default=str)}`")
    meta = results.get("metadata", {})
    for key in ("versions", "git", "device", "seed"):
        if key in meta:
            lines.append(f"- **{key}**: `{json.dumps(meta[key], default=str)}`")
    if results.get("task") == "chair":
        lines += ["", "Captions with highlighted objects: [captions.html](captions.html)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_runs(runs: Sequence[tuple[str, dict[str, Any]]], path: str | os.PathLike) -> Path:
    """Bar chart comparing runs: POPE F1 and accuracy per split, or CHAIR metrics.

    Args:
        runs: ``(label, results)`` pairs, all of the same task.
        path: PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = {r.get("task") for _, r in runs}
    if len(tasks) != 1:
        raise DataError(f"cannot plot runs of different tasks together: {sorted(map(str, tasks))}")
    task = tasks.pop()
    if task == "pope":
        groups = [f"{s} {m}" for s in runs[0][1].get("splits", {}) for m in ("F1", "acc")]
        values = [
            [
                100 * r.get("splits", {}).get(g.split()[0], {}).get("f1" if g.endswith("F1") else "accuracy", 0.0)
                for g in groups
            ]
            for _, r in runs
        ]
    else:
        groups = list(_CHAIR_COLS)
        values = [[100 * r.get("metrics", {}).get(c, 0.0) for c in groups] for _, r in runs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) * max(1, len(runs)) ** 0.5 + 2), 3.6))
    width = 0.8 / max(1, len(runs))
    for i, ((label, _), vals) in enumerate(zip(runs, values, strict=True)):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, vals, width=width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel("%")
    ax.set_title(f"{str(task).upper()}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _highlight(caption: str, mentions: list[dict], hallucinated: list[dict]) -> str:
    bad = {(m["start"], m["end"]) for m in hallucinated}
    parts, pos = [], 0
    for m in sorted(mentions, key=lambda m: m["start"]):
        if m["start"] < pos:  # overlapping spans cannot come from the scorer; skip safely
            continue
        parts.append(html.escape(caption[pos : m["start"]]))
        cls = "hal" if (m["start"], m["end"]) in bad else "ok"
        title = html.escape(f"{m['category']}{' (hallucinated)' if cls == 'hal' else ''}", quote=True)
        parts.append(f'<span class="{cls}" title="{title}">{html.escape(caption[m["start"] : m["end"]])}</span>')
        pos = m["end"]
    parts.append(html.escape(caption[pos:]))
    return "".join(parts).replace("\n", "<br>")


def captions_html(records: Iterable[dict], path: str | os.PathLike, title: str = "CHAIR captions") -> Path:
    """Write an HTML page of captions with hallucinated objects in red, correct ones in green.

    All caption text, ids and categories are HTML-escaped.
    """
    rows = []
    for rec in records:
        ident = html.escape(str(rec.get("image_id", rec.get("image", rec.get("key", "")))))
        if "error" in rec:
            rows.append(
                f'<tr><td>{ident}</td><td class="err">error: {html.escape(str(rec["error"]))}</td><td></td></tr>'
            )
            continue
        body = _highlight(rec.get("caption", ""), rec.get("mentions", []), rec.get("hallucinated", []))
        gt = html.escape(", ".join(rec.get("ground_truth", [])))
        rows.append(f"<tr><td>{ident}</td><td>{body}</td><td>{gt}</td></tr>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} td {{ vertical-align: top; padding: .4em; border-bottom: 1px solid #ddd; }}
.hal {{ background: #f8b4b4; font-weight: bold; }} .ok {{ background: #c6efce; }} .err {{ color: #a00; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p><span class="hal">red</span>: hallucinated object; <span class="ok">green</span>: object in the ground truth.</p>
<table><tr><th>image</th><th>caption</th><th>ground truth</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _unit_counts(run_dir: Path, results: dict[str, Any], splits: Sequence[str] | None = None):
    """Per-image counts and metric function of a run, read back from its samples.jsonl."""
    from vlmfix.eval.chair.scorer import chair_metric_fn, chair_unit_counts
    from vlmfix.eval.pope.metrics import pope_metric_fn, pope_unit_counts

    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no samples.jsonl; paired comparison needs the per-sample records")
    records = list(read_jsonl(path, strict=False))
    if results.get("task") == "pope":
        units, counts = pope_unit_counts(records, splits or [])
        return units, counts, pope_metric_fn(splits or [])
    units, counts = chair_unit_counts(records)
    return units, counts, chair_metric_fn


def paired_comparison(
    run_a: str | os.PathLike, run_b: str | os.PathLike, spec: BootstrapSpec | None = None
) -> dict[str, Any]:
    """Paired bootstrap of every metric of run B minus run A over the images both scored.

    Returns:
        :func:`vlmfix.eval.bootstrap.paired_differences`'s dict; POPE metric names are
        ``<split>/<metric>`` (splits both runs hold) and ``mean_f1``.
    """
    res_a, res_b = load_results(run_a), load_results(run_b)
    if res_a.get("task") != res_b.get("task"):
        raise DataError(f"cannot compare runs of different tasks: {res_a.get('task')} vs {res_b.get('task')}")
    splits = None
    if res_a.get("task") == "pope":
        splits = [s for s in res_a.get("splits", {}) if s in res_b.get("splits", {})]
        if not splits:
            raise DataError(f"{run_a} and {run_b} share no POPE split; compare runs on the same question files")
    ua, ca, fn = _unit_counts(Path(run_a), res_a, splits)
    ub, cb, _ = _unit_counts(Path(run_b), res_b, splits)
    return paired_differences(ua, ca, ub, cb, fn, spec)


def _diff_rows(label: str, diff: dict[str, Any]) -> list[str]:
    rows = []
    for name, d in diff["metrics"].items():
        scale = 1.0 if name.endswith("Len") else 100.0  # Len is tokens, the rest are shown ×100
        shown = name.replace("_", "\\_")
        lo, hi = (scale * x for x in d["ci"])
        rows.append(
            f"| {label} | {shown} | {scale * d['a']:.1f} | {scale * d['b']:.1f} | {scale * d['diff']:+.1f} | "
            f"[{lo:+.1f}, {hi:+.1f}] | {'**yes**' if d['outside'] else 'no'} |"
        )
    return rows


def compare_runs(
    run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, bootstrap: BootstrapSpec | None = None
) -> Path:
    """Put several run folders of one task into ``comparison.md``, ``comparison.json`` and
    ``comparison.png``.

    Every run after the first is compared with the first by a paired bootstrap over the
    images both scored (:func:`paired_comparison`): the table gives each metric's
    difference, its 95% interval and whether the difference is outside it (the interval
    excludes 0).

    Returns:
        The path of ``comparison.md``.
    """
    if not run_dirs:
        raise DataError("compare_runs needs at least one run folder")
    spec = bootstrap or BootstrapSpec()
    runs = [(run_label(load_results(d), Path(d).name), load_results(d)) for d in run_dirs]
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):  # same model and methods: tell them apart by folder
        runs = [(f"{label} ({Path(d).name})", r) for (label, r), d in zip(runs, run_dirs, strict=True)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_runs(runs, out / "comparison.png")
    lines = [f"# Comparison of {len(runs)} runs", ""]
    for i, (label, res) in enumerate(runs):
        table = _table(res, label)
        lines += table if i == 0 else table[2:]
    pairs: list[dict[str, Any]] = []
    if len(runs) > 1:
        base = runs[0][0]
        lines += [
            "",
            f"## Differences from {base} (paired bootstrap)",
            "",
            f"Each run minus **{base}** on the images both scored; 95% percentile interval of the "
            f"difference over {spec.n_resamples} paired resamples of images (seed {spec.seed}). "
            "*Outside* = the interval excludes 0: the difference is larger than image sampling explains.",
            "",
            "| run | metric | baseline | run | difference | 95% interval | outside? |",
            "|---|---|---|---|---|---|---|",
        ]
        for (label, _), d in zip(runs[1:], run_dirs[1:], strict=True):
            diff = paired_comparison(run_dirs[0], d, spec)
            pairs.append({"baseline": str(run_dirs[0]), "run": str(d), "label": label, **diff})
            lines += _diff_rows(label, diff)
        notes = [p for p in pairs if p["n_only_a"] or p["n_only_b"]]
        for p in notes:
            lines.append(
                f"\nNote: {p['label']} pairs {p['n_shared_units']} images; {p['n_only_a']} only in the baseline "
                f"and {p['n_only_b']} only in this run are left out of its differences."
            )
    lines += ["", f"![comparison]({plot.name})", ""]
    path = out / "comparison.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"runs": [{"dir": str(d), "label": lab} for d, (lab, _) in zip(run_dirs, runs, strict=True)]}
    summary["paired"] = pairs
    summary["bootstrap"] = spec.to_dict()
    (out / "comparison.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return path
