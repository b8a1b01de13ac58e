"""Evaluation of object hallucination: POPE and CHAIR, faithful to the references.

Submodules (imported on first use, so ``import vlmfix.eval`` stays light and never
imports torch):

- :mod:`vlmfix.eval.pope` — question files, builder, templates, parsers, metrics, runner
- :mod:`vlmfix.eval.chair` — tokenizer, normalizer, vocabulary, ground truth, metrics, runner
- :mod:`vlmfix.eval.runner` — batched, resumable, ``accelerate``-sharded sample loop
- :mod:`vlmfix.eval.report` — results.json, report.md, plots, caption HTML, comparisons
- :mod:`vlmfix.eval.cli` — ``vlmfix eval pope|chair|compare``
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["chair", "cli", "pope", "report", "runner"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
