"""``vlmfix bench``: decoding speed of stock transformers and vlmfix on full-size random LLaVA models.

DESIGN.md section 9: build LLaVA-1.5-7B / LLaVA-NeXT-7B from their configs with random
weights (compute does not depend on weight values, so nothing is downloaded), fix the
generated length, and report every figure next to stock ``model.generate`` measured in
the same process. A *suite* (YAML) names the models, dtype, batch sizes, prompt and image
settings, the number of new tokens and rounds, and the variants:

- ``stock``: ``model.generate`` with its ``DynamicCache``, greedy, EOS stopping off
  (``min_new_tokens``), sdpa;
- ``stock_static``: the same with ``cache_implementation="static"`` (transformers compiles
  the decode step; its compile shows as warm-up, not in the timed rounds);
- vlmfix variants: :func:`vlmfix.generate` with a list of methods (``[]`` is plain vlmfix)
  and a ``decode_path`` (passed only where the installed ``generate`` accepts it).

For each (model, batch, variant) :func:`run_suite` measures prefill (a call with one new
token), decode ms/step ``(t(N) - t(1)) / (N - 1)``, tokens/s ``B * N / t(N)``, peak GPU
memory, warm-up (first call minus the median of the timed ones) and ratios of each figure
to ``stock``, ``stock_static`` and plain vlmfix. Variants run interleaved in rounds (one
call of each per round; medians over rounds), so a drift of the machine's speed hits all
alike. Every timed call starts from PIL images and prompt strings (the stock variants run
the processor inside the timed call too, as :func:`vlmfix.generate` does). A variant that
fails is recorded with its error and the suite goes on.

Outputs, in one folder: ``results.json`` (every number, the samples they come from and
how they were produced), ``results.md`` (a table per model and batch) and ``decode.png``.

Command line::

    vlmfix bench                          # the shipped default suite (configs/bench/decode.yaml), CUDA
    vlmfix bench --suite tiny             # CPU dry run on the tiny random model
    vlmfix bench my_suite.yaml --out runs/bench-mine

Example:
    >>> suite = load_suite("tiny")
    >>> [v.name for v in suite.variants][:3]
    ['stock', 'stock_static', 'plain']
"""

from __future__ import annotations

from vlmfix.bench.cli import register
from vlmfix.bench.measure import RATIO_REFS, add_ratios, check_environment, measure_batch, run_suite, summarize
from vlmfix.bench.models import (
    MODELS,
    ModelSpec,
    build_llava_7b,
    build_llava_next_7b,
    build_model,
    instantiate,
    make_batch,
)
from vlmfix.bench.report import RESULT_FILES, markdown_report, plot_decode, write_json, write_results
from vlmfix.bench.suite import SUITE_DIR, Suite, Variant, load_suite, parse_suite, shipped_suites

__all__ = [
    "SUITE_DIR",
    "MODELS",
    "ModelSpec",
    "RATIO_REFS",
    "RESULT_FILES",
    "Suite",
    "Variant",
    "load_suite",
    "parse_suite",
    "shipped_suites",
    "check_environment",
    "instantiate",
    "build_model",
    "build_llava_7b",
    "build_llava_next_7b",
    "make_batch",
    "summarize",
    "add_ratios",
    "measure_batch",
    "run_suite",
    "write_json",
    "write_results",
    "markdown_report",
    "plot_decode",
    "register",
]
