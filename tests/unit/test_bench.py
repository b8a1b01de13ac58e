"""`vlmfix bench` without a model: suite validation, figures, ratios and the written reports."""

from __future__ import annotations

import json

import pytest

from vlmfix.bench import (
    add_ratios,
    check_environment,
    load_suite,
    markdown_report,
    parse_suite,
    shipped_suites,
    summarize,
    write_results,
)
from vlmfix.bench.measure import _accepts_decode_path
from vlmfix.cli import main
from vlmfix.errors import ConfigError

BASE = {"models": ["tiny"], "variants": ["stock", "plain"]}


def _variants(*entries):
    return {**BASE, "variants": list(entries)}


@pytest.mark.parametrize(
    "data, where, hint",
    [
        ([1, 2], "t.yaml", "expected a mapping"),
        ({**BASE, "batch_size": [1]}, "batch_size: unknown key", "did you mean 'batch_sizes'"),
        ({**BASE, "batch_sizes": [0]}, "batch_sizes", "whole numbers >= 1"),
        ({**BASE, "batch_sizes": ["8"]}, "batch_sizes", "whole numbers >= 1"),
        ({**BASE, "batch_sizes": [True]}, "batch_sizes", "whole numbers >= 1"),
        ({**BASE, "batch_sizes": []}, "batch_sizes", "e.g. batch_sizes: [1, 8, 32]"),
        ({**BASE, "batch_sizes": [1, 8, 1]}, "batch_sizes", "list each once"),
        ({**BASE, "new_tokens": 1}, "new_tokens", ">= 2"),
        ({**BASE, "repeats": 0}, "repeats", ">= 1"),
        ({**BASE, "dtype": "fp16"}, "dtype", "float16"),
        ({**BASE, "backend": "cuda"}, "backend", "reference"),
        ({**BASE, "decode_path": "cudagraph"}, "decode_path", "graph"),
        ({**BASE, "prompt_words": [9, 3]}, "prompt_words", "min <= max"),
        ({**BASE, "image_size": 2}, "image_size", ">= 8"),
        ({"variants": ["stock"]}, "models: missing", "llava-1.5-7b"),
        ({**BASE, "models": ["llava-1.5-7"]}, "models", "did you mean 'llava-1.5-7b'"),
        ({**BASE, "models": ["tiny", "tiny"]}, "models", "name each once"),
        ({**BASE, "variants": []}, "variants", "e.g. variants:"),
        (_variants("stock", "vcdd"), "variants[1]", "did you mean 'vcd'"),
        (_variants({"name": "x", "methods": ["vcdd"]}), "variants[0] (x).methods[0]", "did you mean 'vcd'"),
        (_variants({"name": "x", "methods": [{"name": "vcd", "alfa": 1}]}), "variants[0] (x).methods[0]", "alfa"),
        (_variants({"name": "x", "methods": [{"name": "vcd", "alpha": "big"}]}), "methods[0]", "alpha"),
        (_variants({"name": "x", "methods": ["vcd", "vcd"]}), "variants[0] (x).methods", "listed twice"),
        (_variants({"name": "x"}), "variants[0] (x).methods: missing", "methods: []"),
        (_variants({"name": "x", "methods": "vcd"}), "variants[0] (x).methods", "not a list"),
        (_variants({"name": "stock", "methods": []}), "variants[0] (stock).methods", "vlmfix variants only"),
        (_variants({"name": "x", "kind": "stock", "decode_path": "eager"}), "(x).decode_path", "vlmfix variants only"),
        (_variants({"name": "x", "methods": [], "decode_path": "fast"}), "(x).decode_path", "auto, eager"),
        (_variants({"name": "x", "methods": [], "speed": 1}), "variants[0].speed: unknown key", "known:"),
        (_variants({"methods": []}), "variants[0].name", "needs a name"),
        (_variants("plain", {"name": "plain", "methods": []}), "variants[1]", "used twice"),
        (_variants(3), "variants[0]", "neither a name nor a mapping"),
    ],
)
def test_invalid_suite_names_the_key_and_the_fix(data, where, hint):
    with pytest.raises(ConfigError) as err:
        parse_suite(data, name="t", source="t.yaml")
    message = str(err.value)
    assert message.startswith("bench suite t.yaml")
    assert where in message, message
    assert hint in message, message


def test_suite_shorthand_and_long_forms():
    suite = parse_suite(
        {
            "models": "tiny",
            "decode_path": "graph",
            "variants": [
                "stock",
                "stock_static",
                "plain",
                "vcd",
                {"name": "var+vcd", "methods": [{"name": "var", "tau": 2.5}, "vcd"], "decode_path": "eager"},
                {"name": "hf", "kind": "stock"},
            ],
        },
        name="t",
    )
    assert suite.models == ("tiny",) and suite.batch_sizes == (1, 8, 32) and suite.new_tokens == 64
    kinds = {v.name: (v.kind, v.decode_path, [m.name for m in v.methods]) for v in suite.variants}
    assert kinds == {
        "stock": ("stock", None, []),
        "stock_static": ("stock_static", None, []),
        "plain": ("vlmfix", "graph", []),
        "vcd": ("vlmfix", "graph", ["vcd"]),
        "var+vcd": ("vlmfix", "eager", ["var", "vcd"]),
        "hf": ("stock", None, []),
    }
    var = suite.variants[4].methods[0]
    assert var.tau == 2.5
    assert suite.to_dict()["variants"][4]["methods"][0]["tau"] == 2.5


def test_shipped_suites():
    assert {"decode", "methods", "tiny"} <= set(shipped_suites())
    for name in shipped_suites():  # every shipped suite parses
        assert load_suite(name).variants
    methods = load_suite("methods")
    assert methods.batch_sizes == (1, 8) and "stock_static" not in [v.name for v in methods.variants]
    decode = load_suite(None)  # the default
    assert decode.name == "decode" and decode.models == ("llava-1.5-7b",)
    assert decode.batch_sizes == (1, 8, 32)
    assert [v.name for v in decode.variants] == [
        "stock", "stock_static", "plain", "plain-eager", "var", "pai", "paint", "vhr", "vcd"
    ]
    paths = {v.name: v.decode_path for v in decode.variants if v.kind == "vlmfix"}
    assert paths.pop("plain-eager") == "eager" and set(paths.values()) == {"auto"}
    assert "stock_static" in decode.text  # the suite text is kept for the record
    tiny = load_suite("tiny")
    assert tiny.models == ("tiny",) and tiny.batch_sizes == (1, 2) and tiny.new_tokens == 4 and tiny.repeats == 1


def test_the_benchmark_suites_in_the_repo_are_valid():
    """The suites that docs/benchmarks.md runs by path (benchmarks/suites/*.yaml)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "benchmarks" / "suites"
    suites = {p.stem: load_suite(str(p)) for p in sorted(folder.glob("*.yaml"))}
    assert {"methods-reference", "methods-next"} <= set(suites)
    assert suites["methods-reference"].backend == "reference"
    assert suites["methods-next"].models == ("llava-next-7b",) and suites["methods-next"].batch_sizes == (2,)


def test_load_suite_errors(tmp_path):
    with pytest.raises(ConfigError, match="shipped suite.*decode"):
        load_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [tiny\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_suite(bad)
    good = tmp_path / "mine.yaml"
    good.write_text("models: [tiny]\nbatch_sizes: [3]\nvariants: [plain]\n")
    assert load_suite(good).batch_sizes == (3,)


def test_full_size_model_refused_on_cpu_before_building(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*--suite tiny"):
        check_environment(load_suite("decode"))
    with pytest.raises(ConfigError, match="device: cuda asked for CUDA"):
        check_environment(parse_suite({**BASE, "device": "cuda"}, name="t"))


def test_summarize_from_samples():
    samples = {"prefill_s": [0.1, 0.3, 0.2], "total_s": [1.0, 1.4, 1.2], "first_total_s": 5.0}
    samples.update(peak_bytes=3 * 2**30, peak_rise_bytes=2**29)
    got = summarize(samples, batch=4, new_tokens=11)
    assert got["prefill_ms"] == pytest.approx(200.0)
    assert got["total_s"] == pytest.approx(1.2)
    assert got["decode_ms"] == pytest.approx(100.0)  # (1.2 - 0.2) / 10 s
    assert got["tokens_per_s"] == pytest.approx(44 / 1.2)
    assert got["warmup_s"] == pytest.approx(3.8)
    assert got["peak_gib"] == pytest.approx(3.0) and got["peak_rise_gib"] == pytest.approx(0.5)
    assert summarize({"prefill_s": [0.1], "total_s": [0.2]}, 1, 2)["peak_gib"] is None


def _row(name, kind, decode_ms, path=None, methods=(), ok=True, batch=2):
    return {
        "variant": name,
        "kind": kind,
        "model": "tiny",
        "batch": batch,
        "methods": [{"name": m} for m in methods],
        "decode_path": path,
        "ok": ok,
        "error": None if ok else "warm-up: OutOfMemoryError: CUDA out of memory",
        "prefill_ms": 10.0 if ok else None,
        "decode_ms": decode_ms,
        "total_s": None if not ok else (10.0 + 3 * decode_ms) / 1e3,
        "tokens_per_s": 1.0,
        "warmup_s": 0.5,
        "peak_gib": None,
        "prompt_tokens": 41,
    }


def _fake_rows():
    return [
        _row("stock", "stock", 20.0),
        _row("stock_static", "stock_static", 10.0),
        _row("plain", "vlmfix", 25.0, "auto"),
        _row("plain-eager", "vlmfix", 30.0, "eager"),
        _row("var", "vlmfix", 50.0, "auto", ["var"]),
        _row("var-eager", "vlmfix", 60.0, "eager", ["var"]),
        _row("vcd", "vlmfix", None, "auto", ["vcd"], ok=False),
    ]


def test_ratios_against_each_reference():
    rows = _fake_rows()
    add_ratios(rows)
    by = {r["variant"]: r["ratios"] for r in rows}
    assert by["var"]["stock"]["decode"] == pytest.approx(2.5)
    assert by["var"]["stock_static"]["decode"] == pytest.approx(5.0)
    assert by["var"]["plain"] == {"variant": "plain", "prefill": 1.0, "decode": 2.0, "total": pytest.approx(160 / 85)}
    # the plain reference is the plain variant on the same decode path
    assert by["var-eager"]["plain"]["variant"] == "plain-eager"
    assert by["var-eager"]["plain"]["decode"] == pytest.approx(2.0)
    assert by["stock"]["stock"]["decode"] == 1.0 and by["stock"]["plain"]["decode"] == pytest.approx(0.8)
    assert by["stock_static"]["stock"]["decode"] == pytest.approx(0.5)
    assert by["vcd"] == {"stock": None, "stock_static": None, "plain": None}  # failed: no ratios


def test_ratio_reference_failed_or_absent():
    rows = [_row("stock", "stock", 20.0, ok=False), _row("var", "vlmfix", 50.0, "auto", ["var"])]
    add_ratios(rows)
    assert rows[1]["ratios"] == {"stock": None, "stock_static": None, "plain": None}
    rows = [_row("stock", "stock", 0.0), _row("plain", "vlmfix", 5.0, "auto")]  # a zero reference: no ratio
    add_ratios(rows)
    assert rows[1]["ratios"]["stock"]["decode"] is None and rows[1]["ratios"]["stock"]["total"] is not None


def _fake_record():
    rows = _fake_rows()
    rows[4]["decode"] = {"path": "graph", "fallback": None, "capture_s": 0.0}
    rows[4]["capture_s"], rows[4]["capture_s_timed"] = 1.5, 0.0
    rows[5]["capture_s"], rows[5]["capture_s_timed"] = 1.5, 1.25  # captured on every call
    rows[1]["samples"] = {"compiles": 2}  # recompiled inside the timed rounds
    rows[2]["decode"] = {"path": "eager", "fallback": "methods not capturable"}
    rows[1]["compiled"] = True
    add_ratios(rows)
    return {
        "schema": "vlmfix.bench/1",
        "status": "complete",
        "suite": {"name": "fake", "dtype": "float16", "new_tokens": 4, "repeats": 3, "description": "A fake run."},
        "backend": "reference",
        "provenance": {
            "device_name": "NVIDIA H100 80GB HBM3",
            "device": "cuda:0",
            "versions": {"torch": "2.13", "transformers": "5.24", "vlmfix": "0.1.0"},
            "git": "0123456789abcdef",
            "date": "2026-11-26T00:00:00+00:00",
            "command": ["vlmfix", "bench", "--suite", "fake"],
            "decode_path_supported": True,
        },
        "models": {"tiny": {"error": None}},
        "rows": rows,
    }


def test_markdown_table_from_rows():
    md = markdown_report(_fake_record())
    assert md.startswith("# vlmfix bench: fake\n")
    assert "NVIDIA H100 80GB HBM3" in md and "`vlmfix bench --suite fake`" in md and "git 0123456789ab" in md
    assert "## tiny, batch 2 (prompts ≤ 41 tokens)" in md
    header = "| variant | decode path | prefill ms | decode ms/step | tokens/s | peak GiB | warm-up s "
    assert header in md
    line = next(x for x in md.splitlines() if x.startswith("| var |"))
    assert "| graph |" in line and "| 50.00 |" in line and "(capture 1.50)" in line
    assert line.endswith("| 2.50x | 5.00x | 2.00x |")
    assert "| eager (fallback: methods not capturable) |" in md
    assert "| stock_static | static cache, compiled |" in md
    assert "| vcd | auto (asked) | failed |" in md
    assert "- vcd: warm-up: OutOfMemoryError: CUDA out of memory" in md
    assert "- stock_static: torch.compile compiled 2 frame(s) during the timed rounds" in md
    assert "- var-eager: the decode path captured again in the timed calls (1.25 s in the last)" in md
    assert "- var:" not in md  # nothing to say about a row whose timed calls only decode


def test_write_results(tmp_path):
    record = _fake_record()
    paths = write_results(record, tmp_path / "run")
    assert [p.name for p in paths] == ["results.json", "results.md", "decode.png"]
    assert json.loads(paths[0].read_text())["rows"][4]["ratios"]["plain"]["decode"] == pytest.approx(2.0)
    assert paths[1].read_text() == markdown_report(record)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_path_detection():
    def old(model, processor, images, prompts, methods=(), *, max_new_tokens=64): ...

    def new(model, processor, images, prompts, methods=(), *, max_new_tokens=64, decode_path="auto"): ...

    assert not _accepts_decode_path(old) and _accepts_decode_path(new)


def test_cli_refuses_a_non_empty_out_and_checks_suites(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["bench", "--suite", "tiny", "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["bench", "mine.yaml", "--suite", "tiny"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["bench", "--suite", "nope"]) == 2
    assert "shipped suite" in capsys.readouterr().err
    assert main(["bench", "--suite", "tiny", "--check"]) == 0
    assert "suite tiny" in capsys.readouterr().out


def test_the_suite_in_the_docs_is_valid():
    import re
    from pathlib import Path

    import yaml

    doc = (Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", doc, re.S).group(1)
    suite = parse_suite(yaml.safe_load(block), name="docs")
    assert [v.name for v in suite.variants][-1] == "pai-strong" and suite.variants[-1].methods[0].alpha == 0.5
