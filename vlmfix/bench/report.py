"""What ``vlmfix bench`` writes: ``results.json`` (the record), ``results.md`` (a table per
model and batch) and ``decode.png`` (decode ms/step per variant, grouped by batch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError

__all__ = ["RESULT_FILES", "jsonable", "write_json", "write_results", "markdown_report", "plot_decode"]

RESULT_FILES = ("results.json", "results.md", "decode.png")


def jsonable(value: Any) -> Any:
    """``value`` with every non-JSON leaf (tensor scalars, paths, objects) made JSON-safe."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        return value.item()
    return str(value)


def write_json(record: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(jsonable(record), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_results(record: dict, out: str | os.PathLike) -> list[Path]:
    """Write ``results.json``, ``results.md`` and ``decode.png`` of a record into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, out / "results.json")
    (out / "results.md").write_text(markdown_report(record), encoding="utf-8")
    plot_decode(record, out / "decode.png")
    return [out / f for f in RESULT_FILES]


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _path_label(row: dict) -> str:
    if row["kind"] == "stock":
        return "dynamic cache"
    if row["kind"] == "stock_static":
        return "static cache, compiled" if row.get("compiled", True) else "static cache, not compiled"
    decode = row.get("decode") or {}
    if decode.get("path"):
        fallback = decode.get("fallback")
        return f"{decode['path']} (fallback: {fallback})" if fallback else str(decode["path"])
    if row.get("decode_path_passed") is False:
        return "eager (no decode_path in this vlmfix)"
    return f"{row.get('decode_path')} (asked)"


def _ratio_cell(row: dict, ref: str) -> str:
    r = (row.get("ratios") or {}).get(ref)
    return "—" if not r or r.get("decode") is None else f"{r['decode']:.2f}x"


def _timing_notes(row: dict) -> list[str]:
    """What makes a row's timed calls measure more than decoding (compiles, captures)."""
    notes = []
    compiles = (row.get("samples") or {}).get("compiles")
    if compiles:
        notes.append(
            f"- {row['variant']}: torch.compile compiled {compiles} frame(s) during the timed rounds; "
            "its times include compilation"
        )
    if row.get("capture_s_timed"):
        notes.append(
            f"- {row['variant']}: the decode path captured again in the timed calls "
            f"({row['capture_s_timed']:.2f} s in the last); its times include capture"
        )
    return notes


def markdown_report(record: dict) -> str:
    """The Markdown report: how it was produced, then a table per model and batch."""
    suite, prov = record.get("suite", {}), record.get("provenance", {})
    versions = prov.get("versions", {})
    lines = [f"# vlmfix bench: {suite.get('name', '?')}", ""]
    if suite.get("description"):
        lines += [str(suite["description"]).strip(), ""]
    lines += [
        f"- device: {prov.get('device_name', '?')} ({prov.get('device', '?')}); torch {versions.get('torch', '?')}"
        f" (CUDA {prov.get('cuda')}), transformers {versions.get('transformers', '?')}, "
        f"vlmfix {versions.get('vlmfix', '?')} (git {str(prov.get('git'))[:12]}); {prov.get('date', '?')}",
        f"- command: `{' '.join(prov.get('command') or ['?'])}`",
        f"- {suite.get('dtype')}, sdpa with cuDNN sdpa off, vlmfix backend {record.get('backend')}; "
        f"{suite.get('new_tokens')} new tokens per sample (greedy, EOS stopping off); "
        f"medians over {suite.get('repeats')} interleaved round(s); random weights and images",
        "- prefill = a call with 1 new token; decode ms/step = (t(N) − t(1)) / (N − 1); tokens/s = B·N / t(N); "
        "warm-up = first call − median call; peak GiB = `torch.cuda.max_memory_allocated` over a variant's calls, "
        "graphs that other variants keep included (results.json: `peak_rise_gib`, the rise above what was held)",
        "- × columns: decode ms/step ÷ the reference's (below 1 is faster); stock = `model.generate` "
        '(DynamicCache), stock static = `cache_implementation="static"`, plain = vlmfix without methods',
    ]
    if prov.get("decode_path_supported") is False:
        lines.append("- this vlmfix's `generate` takes no `decode_path`: every vlmfix variant ran its eager loop")
    if record.get("status") != "complete":
        lines.append(f"- status: {record.get('status')} (the run did not finish)")
    rows = record.get("rows", [])
    for model in dict.fromkeys(r["model"] for r in rows):
        info = record.get("models", {}).get(model, {})
        for batch in dict.fromkeys(r["batch"] for r in rows if r["model"] == model):
            group = [r for r in rows if r["model"] == model and r["batch"] == batch]
            tokens = max((r.get("prompt_tokens") or 0 for r in group), default=0)
            lines += ["", f"## {model}, batch {batch}" + (f" (prompts ≤ {tokens} tokens)" if tokens else ""), ""]
            if info.get("error"):
                lines += [f"Model not built: {info['error']}"]
                continue
            lines += [
                "| variant | decode path | prefill ms | decode ms/step | tokens/s | peak GiB | warm-up s "
                "| × stock | × stock static | × plain |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            errors, notes = [], []
            for r in group:
                if not r.get("ok"):
                    lines.append(f"| {r['variant']} | {_path_label(r)} | failed | | | | | | | |")
                    errors.append(f"- {r['variant']}: {r.get('error')}")
                    continue
                notes += _timing_notes(r)
                warm = _fmt(r.get("warmup_s"), 2)
                if r.get("capture_s") is not None:
                    warm += f" (capture {r['capture_s']:.2f})"
                lines.append(
                    f"| {r['variant']} | {_path_label(r)} | {_fmt(r['prefill_ms'], 1)} | {_fmt(r['decode_ms'], 2)} "
                    f"| {_fmt(r['tokens_per_s'], 1)} | {_fmt(r.get('peak_gib'), 2)} | {warm} "
                    f"| {_ratio_cell(r, 'stock')} | {_ratio_cell(r, 'stock_static')} | {_ratio_cell(r, 'plain')} |"
                )
            if notes:
                lines += ["", "Read with care:", *notes]
            if errors:
                lines += ["", "Failed:", *errors]
    return "\n".join(lines) + "\n"


def plot_decode(record: dict, path: str | os.PathLike) -> Path:
    """Bar chart of decode ms/step: one panel per model, batches as groups, a bar per variant
    (failed variants have no bar)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "vlmfix bench draws decode.png with matplotlib, which is not installed: pip install matplotlib"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record.get("rows", [])
    models = list(dict.fromkeys(r["model"] for r in rows)) or ["(no rows)"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    most = max((len({r["batch"] for r in rows if r["model"] == m}) for m in models), default=1)
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.0, 2.0 + 0.25 * len(variants) * most) * len(models), 4.0))
    axes = [axes] if len(models) == 1 else list(axes)
    device = record.get("provenance", {}).get("device_name", "")
    for ax, model in zip(axes, models):
        batches = list(dict.fromkeys(r["batch"] for r in rows if r["model"] == model))
        width = 0.8 / max(1, len(variants))
        for i, name in enumerate(variants):
            values = []
            for b in batches:
                row = next((r for r in rows if r["model"] == model and r["batch"] == b and r["variant"] == name), None)
                values.append(row["decode_ms"] if row and row.get("ok") else float("nan"))
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(batches))]
            ax.bar(xs, values, width=width, label=name)
        ax.set_xticks(range(len(batches)))
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel("decode ms/step")
        ax.set_title(f"{model}" + (f" ({device})" if device else ""), fontsize="medium")
    axes[-1].legend(fontsize="small", ncol=2 if len(variants) > 6 else 1)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
