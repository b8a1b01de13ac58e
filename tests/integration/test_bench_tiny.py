"""`vlmfix bench` end to end on the CPU: the shipped tiny suite, and how variants report
their decode path and their failures."""

from __future__ import annotations

import json

import pytest

from vlmfix.bench import summarize
from vlmfix.cli import main


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def test_tiny_suite_end_to_end(tmp_path, capsys):
    import torch

    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "tiny", "--out", str(out)]) == 0
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn  # switched off for the run only
    assert (out / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert capsys.readouterr().out.strip() == md.strip()
    record = json.loads((out / "results.json").read_text())

    assert record["status"] == "complete" and record["suite"]["name"] == "tiny"
    prov = record["provenance"]
    assert prov["command"] == ["vlmfix", "bench", "--suite", "tiny", "--out", str(out)]
    assert "models: [tiny]" in prov["suite_text"]
    assert prov["device_name"] == "CPU" and prov["cudnn_sdp"] is False
    assert set(prov["versions"]) >= {"torch", "transformers", "vlmfix"} and prov["date"]

    rows = record["rows"]
    names = [v["name"] for v in record["suite"]["variants"]]
    assert [(r["batch"], r["variant"]) for r in rows] == [(b, n) for b in (1, 2) for n in names]
    failed = [(r["variant"], r["error"]) for r in rows if not r["ok"]]
    assert not failed
    for r in rows:
        # every figure comes from the recorded samples ...
        assert len(r["samples"]["total_s"]) == 1 and r["peak_gib"] is None
        assert r["samples"]["first_total_s"] > 0
        for key, value in summarize(r["samples"], r["batch"], 4).items():
            assert r[key] == pytest.approx(value), key
        # ... and every ratio from the figures of its reference, measured in this run
        group = {g["variant"]: g for g in rows if g["batch"] == r["batch"]}
        for ref in ("stock", "stock_static", "plain"):
            ratio = r["ratios"][ref]
            assert ratio is not None, (r["variant"], ref)
            base = group[ratio["variant"]]
            assert ratio["total"] == pytest.approx(r["total_s"] / base["total_s"])
            assert ratio["prefill"] == pytest.approx(r["prefill_ms"] / base["prefill_ms"])
            assert ratio["decode"] == pytest.approx(_ratio(r["decode_ms"], base["decode_ms"]))
        assert r["ratios"]["stock"]["variant"] == "stock"
        assert r["ratios"]["stock_static"]["variant"] == "stock_static"
        if r["kind"] == "vlmfix":
            assert r["ratios"]["plain"]["variant"] == ("plain-eager" if r["decode_path"] == "eager" else "plain")
    stock_static = next(r for r in rows if r["variant"] == "stock_static")
    assert stock_static["compiled"] is False  # transformers compiles the static-cache decode step on CUDA only
    var = next(r for r in rows if r["variant"] == "var")
    assert [(m["name"], m["tau"]) for m in var["methods"]] == [("var", 2.5)]  # options from the suite
    assert any(k.startswith("var.") for k in var["stats"])  # method telemetry is recorded
    for name in names:
        assert f"| {name} |" in md
    assert "## tiny, batch 1" in md and "## tiny, batch 2" in md


SUITE = """
models: [tiny]
dtype: float32
batch_sizes: [1]
new_tokens: 2
repeats: 1
variants: {variants}
"""


def _fake_generate(monkeypatch, fail=lambda methods: False):
    """Stand in for a vlmfix.generate that takes decode_path and reports what it did."""
    from vlmfix import generation

    real = generation.generate
    calls = []

    def generate(model, processor, images, prompts, methods=(), *, decode_path="auto", **kwargs):
        calls.append(decode_path)
        if fail(methods):
            raise RuntimeError("boom")
        out = real(model, processor, images, prompts, methods, **kwargs)
        path = "eager" if decode_path == "eager" else "graph"
        out.decode = {"path": path, "fallback": None, "capture_s": 0.25 if path == "graph" else 0.0}
        return out

    monkeypatch.setattr(generation, "generate", generate)
    return calls


def test_decode_path_passed_and_failures_recorded(tmp_path, monkeypatch, capsys):
    calls = _fake_generate(monkeypatch, fail=lambda methods: any(m.name == "vcd" for m in methods))
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.format(variants="[plain, {name: plain-eager, methods: [], decode_path: eager}, vcd]"))
    out = tmp_path / "run"
    assert main(["bench", str(suite), "--out", str(out)]) == 0  # one variant failed, the others ran
    record = json.loads((out / "results.json").read_text())
    assert record["provenance"]["decode_path_supported"] is True
    assert set(calls) == {"auto", "eager"}
    rows = {r["variant"]: r for r in record["rows"]}
    assert rows["plain"]["decode_path_passed"] is True
    assert rows["plain"]["decode"] == {"path": "graph", "fallback": None, "capture_s": 0.25}
    assert rows["plain"]["decode_first"] == rows["plain"]["decode"]
    assert rows["plain"]["capture_s"] == 0.25 and rows["plain"]["capture_s_timed"] == 0.25
    assert rows["plain-eager"]["decode"]["path"] == "eager"
    assert rows["plain-eager"]["ratios"]["plain"]["variant"] == "plain-eager"
    assert rows["vcd"]["ok"] is False and rows["vcd"]["error"] == "warm-up: RuntimeError: boom"
    md = (out / "results.md").read_text()
    assert "| plain | graph |" in md and "(capture 0.25)" in md
    assert "- plain: the decode path captured again in the timed calls (0.25 s in the last)" in md
    assert "| vcd | auto (asked) | failed |" in md and "- vcd: warm-up: RuntimeError: boom" in md
    assert "FAILED" in capsys.readouterr().err


def test_exit_status_when_every_variant_fails(tmp_path, monkeypatch, capsys):
    _fake_generate(monkeypatch, fail=lambda methods: True)
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.format(variants="[plain, vcd]"))
    out = tmp_path / "run"
    assert main(["bench", str(suite), "--out", str(out)]) == 1
    assert "every variant failed" in capsys.readouterr().err
    assert (out / "results.json").exists() and (out / "results.md").exists() and (out / "decode.png").exists()
    # an existing folder is refused, then overwritten with --force
    assert main(["bench", str(suite), "--out", str(out)]) == 2
    assert main(["bench", str(suite), "--out", str(out), "--force"]) == 1
