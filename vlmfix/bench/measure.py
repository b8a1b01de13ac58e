"""Timing a suite: every (model, batch, variant), interleaved in rounds, in one process.

Per variant: a warm-up call pair (1 and N new tokens; stock_static compiles here, a
graph decode path captures here), then ``repeats`` rounds in which every variant runs
once with 1 and once with N new tokens, with ``torch.cuda.synchronize`` around each
call and the peak-memory counter reset per variant. :func:`summarize` turns the samples
into the reported figures and :func:`add_ratios` sets the ratios to the references.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlmfix.bench.models import MODELS, build_model, make_batch
from vlmfix.bench.report import jsonable, write_json, write_results
from vlmfix.bench.suite import STOCK_KINDS, Suite, Variant
from vlmfix.errors import ConfigError

__all__ = ["RATIO_REFS", "check_environment", "summarize", "add_ratios", "measure_batch", "run_suite"]

logger = logging.getLogger(__name__)

#: The references every row is compared with (``row["ratios"][ref]``).
RATIO_REFS = ("stock", "stock_static", "plain")


def check_environment(suite: Suite):
    """Resolve the suite's device and check it can run the suite, before any model is built.

    Returns:
        ``(device, backend)``: the ``torch.device`` and the resolved vlmfix backend.

    Raises:
        ConfigError: the device does not exist here, a full-size model would run on the CPU,
            or the backend cannot run on the device; also when matplotlib is missing.
    """
    import importlib.util

    import torch

    from vlmfix.attention import resolve_backend

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(
            "vlmfix bench draws decode.png with matplotlib, which is not installed: pip install matplotlib"
        )
    name = suite.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"bench suite {suite.source or suite.name}: device: {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"bench suite {suite.source or suite.name}: device: {name} asked for CUDA, but torch "
                f"{torch.__version__} sees no CUDA GPU here; use device: auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"bench suite {suite.source or suite.name}: device: {name}: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    big = [m for m in suite.models if MODELS[m].full_size]
    if big and device.type != "cuda":
        raise ConfigError(
            f"bench suite {suite.source or suite.name}: models: {big[0]} is a full-size 7B model and needs a CUDA "
            f"GPU, but the suite would run on {device}; run `vlmfix bench --suite tiny` for a CPU dry run"
        )
    return device, resolve_backend(suite.backend, device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _accepts_decode_path(fn) -> bool:
    """Whether the installed ``vlmfix.generate`` takes ``decode_path`` (the fast decode path
    is built separately; until it lands the bench must not pass it)."""
    try:
        return "decode_path" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _compile_count() -> int:
    """Frames torch.compile has compiled in this process so far (a private torch counter).

    Nothing can have been compiled before torch.compile loads dynamo, so until then this is
    0 without importing it (the import alone takes seconds)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(utils.counters["frames"].get("total", 0))


def _numeric_stats(stats: dict) -> dict[str, float]:
    """Scalar telemetry of each method (so a method that silently did nothing shows)."""
    flat = {}
    for method, values in (stats or {}).items():
        for key, value in (values or {}).items() if isinstance(values, dict) else ():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{method}.{key}"] = value
    return flat


def _runner(variant: Variant, model, processor, images, prompts, *, device, dtype, backend, pass_path, generate):
    """A callable ``run(n) -> output`` generating exactly ``n`` tokens per sample."""
    import torch

    from vlmfix.generation import prepare_inputs

    if variant.kind in STOCK_KINDS:
        extra = {"cache_implementation": "static"} if variant.kind == "stock_static" else {}

        def run_stock(n: int):
            inputs = prepare_inputs(processor, images, prompts, device=device, dtype=dtype)
            with torch.inference_mode():
                # min_new_tokens = max_new_tokens: EOS cannot end a sample early.
                return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)

        return run_stock

    kwargs: dict[str, Any] = {"backend": backend}
    if pass_path:
        kwargs["decode_path"] = variant.decode_path

    def run_vlmfix(n: int):
        eos = model.generation_config.eos_token_id
        model.generation_config.eos_token_id = []  # no EOS stopping: every sample generates n tokens
        try:
            return generate(model, processor, images, prompts, list(variant.methods), max_new_tokens=n, **kwargs)
        finally:
            model.generation_config.eos_token_id = eos

    return run_vlmfix


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


def _after_failure(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summarize(samples: dict[str, Any], batch: int, new_tokens: int) -> dict[str, Any]:
    """The reported figures of one variant from its timed samples.

    Args:
        samples: ``prefill_s`` and ``total_s`` (seconds of each timed call with 1 and with
            ``new_tokens`` new tokens), ``first_total_s`` (the first call with
            ``new_tokens``, before the timed rounds), ``peak_bytes`` and ``peak_rise_bytes``
            (CUDA only: the largest ``max_memory_allocated`` of a timed call pair, and its
            rise above the memory allocated when the pair started).

    Returns:
        ``prefill_ms`` (median of the 1-token calls), ``total_s`` (median of the N-token
        calls), ``decode_ms`` = (total - prefill) / (N - 1), ``tokens_per_s`` = B * N /
        total, ``warmup_s`` = first N-token call - total, ``peak_gib``, ``peak_rise_gib``.
    """
    prefill = statistics.median(samples["prefill_s"])
    total = statistics.median(samples["total_s"])
    first = samples.get("first_total_s")
    peak, rise = samples.get("peak_bytes"), samples.get("peak_rise_bytes")
    return {
        "prefill_ms": prefill * 1e3,
        "decode_ms": (total - prefill) / (new_tokens - 1) * 1e3,
        "tokens_per_s": batch * new_tokens / total,
        "total_s": total,
        "warmup_s": None if first is None else first - total,
        "peak_gib": None if peak is None else peak / 2**30,
        "peak_rise_gib": None if rise is None else rise / 2**30,
    }


def _reference(row: dict, rows: Sequence[dict], ref: str) -> dict | None:
    ok = [r for r in rows if r.get("ok")]
    if ref in STOCK_KINDS:
        return next((r for r in ok if r["kind"] == ref), None)
    plains = [r for r in ok if r["kind"] == "vlmfix" and not r["methods"]]
    same = [r for r in plains if r.get("decode_path") == row.get("decode_path")]
    return (same or plains or [None])[0]


def add_ratios(rows: Sequence[dict]) -> None:
    """Set ``row["ratios"]`` on every row of one (model, batch) group, in place.

    ``ratios[ref]`` (ref in ``stock``, ``stock_static``, ``plain``) holds the reference's
    name and ``prefill``, ``decode``, ``total`` = this row's figure / the reference's
    (time ratios: < 1 is faster), or is None when the reference is absent or failed. The
    plain reference is the plain vlmfix variant on the same decode path, else the first
    plain one.
    """
    for row in rows:
        row["ratios"] = {}
        for ref_name in RATIO_REFS:
            ref = _reference(row, rows, ref_name) if row.get("ok") else None
            if ref is None:
                row["ratios"][ref_name] = None
                continue
            row["ratios"][ref_name] = {
                "variant": ref["variant"],
                "prefill": _ratio(row["prefill_ms"], ref["prefill_ms"]),
                "decode": _ratio(row["decode_ms"], ref["decode_ms"]),
                "total": _ratio(row["total_s"], ref["total_s"]),
            }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def measure_batch(
    model,
    processor,
    suite: Suite,
    model_name: str,
    batch: int,
    *,
    device,
    backend: str,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time every variant of ``suite`` on one batch of ``model``; one row per variant."""
    import torch

    from vlmfix import generation
    from vlmfix._compat import generate_compiled
    from vlmfix.generation import prepare_inputs

    say = progress or (lambda _msg: None)
    n_new = suite.new_tokens
    dtype = next(model.parameters()).dtype
    size = suite.image_size or MODELS[model_name].image_size
    images, prompts = make_batch(batch, size, seed=suite.seed, words=suite.prompt_words)
    probe = prepare_inputs(processor, images, prompts)
    prompt_tokens = int(probe["attention_mask"].sum(-1).max())
    generate = generation.generate
    pass_path = _accepts_decode_path(generate)
    rows, runs = [], {}
    for v in suite.variants:
        rows.append(
            {
                **v.to_dict(),
                "variant": v.name,
                "model": model_name,
                "batch": batch,
                "new_tokens": n_new,
                "prompt_tokens": prompt_tokens,
                "image_size": size,
                "decode_path_passed": pass_path if v.kind == "vlmfix" else None,
                "ok": True,
                "error": None,
                "samples": {"prefill_s": [], "total_s": [], "first_prefill_s": None, "first_total_s": None},
            }
        )
        runs[v.name] = _runner(
            v, model, processor, images, prompts, device=device, dtype=dtype, backend=backend,
            pass_path=pass_path, generate=generate,
        )  # fmt: skip
    by_name = {r["variant"]: r for r in rows}

    def failed(row: dict, stage: str, exc: BaseException) -> None:
        row.update(ok=False, error=f"{stage}: {_error_text(exc)}")
        logger.warning("%s batch %d %s failed (%s)", model_name, batch, row["variant"], row["error"], exc_info=True)
        say(f"  {row['variant']}: FAILED {row['error']}")
        _after_failure(device)

    def record_output(row: dict, out, key: str) -> None:
        if row["kind"] != "vlmfix":
            return
        decode = getattr(out, "decode", None)
        row[key] = jsonable(decode) if decode is not None else None
        row["stats"] = _numeric_stats(getattr(out, "stats", {}))

    def call_pair(v: Variant) -> tuple[float, float, Any, int]:
        """Seconds of a 1-token and an N-token call, the N-token output, frames compiled."""
        before = _compile_count()
        t1, _ = _timed(lambda: runs[v.name](1), device)
        tn, out = _timed(lambda: runs[v.name](n_new), device)
        return t1, tn, out, _compile_count() - before

    # One untimed call first, so that one-off costs of the device and the libraries
    # (kernel loading, cuBLAS handles, allocator growth) land in no variant's warm-up.
    try:
        with torch.inference_mode():
            model.generate(**prepare_inputs(processor, images, prompts, device=device, dtype=dtype), max_new_tokens=2)
    except Exception as exc:  # a variant that cannot run reports it below
        logger.debug("device warm-up call failed: %s", exc)
        _after_failure(device)

    # Warm-up: the first call pair of each variant (stock_static compiles here, a graph
    # decode path captures here); warm-up = first N-token call - median of the timed ones.
    for v in suite.variants:
        row = by_name[v.name]
        try:
            t1, tn, out, compiled = call_pair(v)
        except Exception as exc:
            failed(row, "warm-up", exc)
            continue
        row["samples"].update(first_prefill_s=t1, first_total_s=tn, warmup_compiles=compiled)
        record_output(row, out, "decode_first")
        if v.kind == "stock_static":  # transformers compiles the decode step on CUDA only
            row["compiled"] = generate_compiled(model)

    for rnd in range(suite.repeats):
        for v in suite.variants:
            row = by_name[v.name]
            if not row["ok"]:
                continue
            try:
                if row["kind"] == "vlmfix":
                    # An untimed call of the same variant first: a captured decode step that
                    # later calls can reuse (vlmfix.fastpath) is then measured as reused, as
                    # in a loop over a dataset; steps that cannot be reused still capture.
                    runs[v.name](n_new)
            except Exception as exc:
                failed(row, f"round {rnd + 1}", exc)
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                held = torch.cuda.memory_allocated(device)
            try:
                t1, tn, out, compiled = call_pair(v)
            except Exception as exc:
                failed(row, f"round {rnd + 1}", exc)
                continue
            samples = row["samples"]
            samples["prefill_s"].append(t1)
            samples["total_s"].append(tn)
            # A compile inside the timed rounds would make them measure compilation: recorded, shown.
            samples["compiles"] = samples.get("compiles", 0) + compiled
            if device.type == "cuda":
                # The peak counts what every variant keeps between calls (compiled or captured
                # graphs and their pools); the rise above what was held at the start does not.
                peak = torch.cuda.max_memory_allocated(device)
                samples["peak_bytes"] = max(samples.get("peak_bytes") or 0, peak)
                samples["peak_rise_bytes"] = max(samples.get("peak_rise_bytes") or 0, peak - held)
            record_output(row, out, "decode")

    for row in rows:
        if row["ok"]:
            row.update(summarize(row["samples"], batch, n_new))
            row["capture_s"] = (row.get("decode_first") or {}).get("capture_s")
            row["capture_s_timed"] = (row.get("decode") or {}).get("capture_s")
            say(
                f"  {row['variant']}: prefill {row['prefill_ms']:.1f} ms, decode {row['decode_ms']:.2f} ms/step, "
                f"{row['tokens_per_s']:.1f} tokens/s"
            )
    add_ratios(rows)
    return rows


# --------------------------------------------------------------------------- running


def _provenance(suite: Suite, device, command: Sequence[str] | None) -> dict[str, Any]:
    import torch

    from vlmfix import generation
    from vlmfix.cli_common import git_hash, versions

    return {
        "command": list(command) if command is not None else None,
        "argv": list(sys.argv),
        "suite_file": suite.source,
        "suite_text": suite.text,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "versions": versions(),
        "cuda": torch.version.cuda,
        "git": git_hash(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "decode_path_supported": _accepts_decode_path(generation.generate),
        "cudnn_sdp": False,
        "stock_eos": "min_new_tokens = max_new_tokens",
        "vlmfix_eos": "generation_config.eos_token_id = [] during the call",
    }


def run_suite(
    suite: Suite,
    out: str | os.PathLike,
    *,
    command: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every (model, batch, variant) of ``suite`` and write ``results.json``,
    ``results.md`` and ``decode.png`` into ``out`` (``results.json`` also after each batch,
    so an interrupted run keeps what it measured).

    cuDNN sdpa is switched off for the whole run (it rebuilds a graph per decode length)
    and restored afterwards.

    Returns:
        The results record (what ``results.json`` holds).

    Raises:
        ConfigError: the suite cannot run here (:func:`check_environment`).
    """
    import torch

    say = progress or (lambda _msg: None)
    device, backend = check_environment(suite)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "schema": "vlmfix.bench/1",
        "status": "running",
        "out": str(out),
        "suite": suite.to_dict(),
        "backend": backend,
        "provenance": _provenance(suite, device, command),
        "models": {},
        "rows": [],
    }
    dtype = getattr(torch, suite.dtype)
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)  # before any measurement, baselines included
    try:
        for name in suite.models:
            say(f"# building {name} ({suite.dtype}, {device})")
            t0 = time.perf_counter()
            try:
                model, processor = build_model(name, device, dtype)
            except Exception as exc:
                error = f"build: {_error_text(exc)}"
                say(f"# {name}: FAILED {error}")
                record["models"][name] = {"error": error}
                for b in suite.batch_sizes:
                    record["rows"] += [
                        {**v.to_dict(), "variant": v.name, "model": name, "batch": b, "ok": False, "error": error}
                        for v in suite.variants
                    ]
                _after_failure(device)
                continue
            record["models"][name] = {
                "description": MODELS[name].description,
                "build_s": time.perf_counter() - t0,
                "parameters": sum(p.numel() for p in model.parameters()),
                "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
                "error": None,
            }
            for b in suite.batch_sizes:
                say(f"# {name} batch {b}")
                record["rows"] += measure_batch(
                    model, processor, suite, name, b, device=device, backend=backend, progress=say
                )
                write_json(record, out / "results.json")
            del model, processor
            _release(device)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_before)
    record["status"] = "complete"
    write_results(record, out)
    return record


def _release(device) -> None:
    """Free a finished model: transformers' compiled decode step (stock_static) holds it."""
    import torch

    gc.collect()
    dynamo = sys.modules.get("torch._dynamo")  # loaded only if something was compiled
    if dynamo is not None:
        dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
