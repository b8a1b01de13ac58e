"""Run POPE: ask every question, parse answers, score per split, write the run folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError
from vlmfix.eval.bootstrap import BootstrapSpec
from vlmfix.eval.pope.data import PopeQuestion
from vlmfix.eval.pope.metrics import POPE_METRIC_VERSION, mean_f1, pope_intervals, pope_metrics
from vlmfix.eval.pope.parsers import apply_template, get_parser, get_template
from vlmfix.eval.report import write_report, write_results
from vlmfix.eval.runner import (
    DistContext,
    GenerateFn,
    Sample,
    check_run_config,
    dist_context,
    replace_records,
    run_samples,
)

__all__ = ["run_pope", "score_pope_records"]

logger = logging.getLogger(__name__)


def run_pope(
    splits: Mapping[str, Sequence[PopeQuestion]],
    images_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    generate_fn: GenerateFn | None,
    *,
    template: str = "llava",
    parser: str = "pope_official",
    batch_size: int = 1,
    run_info: dict[str, Any] | None = None,
    answers: Mapping[str, Mapping[int | str, str]] | None = None,
    ctx: DistContext | None = None,
    progress: bool = False,
    bootstrap: BootstrapSpec | None = None,
    retry_errors: bool = True,
) -> dict[str, Any] | None:
    """Evaluate a model on POPE question sets and write ``out_dir``.

    Args:
        splits: split name -> questions (e.g. from :func:`load_questions`).
        images_dir: folder holding the images the questions name.
        out_dir: run folder: ``samples.jsonl``, ``results.json``, ``report.md``.
        generate_fn: ``(images, prompts) -> answers``.
        template: prompt template name (:data:`TEMPLATES`).
        parser: answer parser name (:data:`PARSERS`).
        batch_size: prompts per ``generate_fn`` call.
        run_info: model id, method configs, decoding settings and metadata to record;
            the keys ``model_id``, ``methods`` and ``generation`` also guard resuming.
        answers: existing answers to score instead of generating: split ->
            ``{question_id: text}`` (from :func:`load_answers`); ``generate_fn`` may be None.
        ctx: distributed context (default: from the environment).
        progress: show a progress bar.
        bootstrap: resamples / seed of the 95% intervals over images (default
            :class:`BootstrapSpec`: 1000 resamples, seed 0).
        retry_errors: on resume, run again samples whose stored record is an error.

    Returns:
        The results dict on rank 0 (also written to ``results.json``), None elsewhere.

    Example:
        >>> run_pope({"random": load_questions("coco_pope_random.json")},
        ...          "val2014", "out/pope", my_generate)  # doctest: +SKIP
    """
    get_template(template)
    answer_parser = get_parser(parser)
    if not splits:
        raise ConfigError("no POPE questions given; pass --questions FILE or --build-from ANNOTATIONS")
    run_info = dict(run_info or {})
    check_run_config(
        out_dir,
        {
            "task": "pope",
            "template": template,
            "model_id": run_info.get("model_id"),
            "methods": run_info.get("methods", []),
            "generation": run_info.get("generation", {}),
            "model_resolved": run_info.get("model_resolved"),
            "dtype": run_info.get("dtype"),
            "source": "answers" if answers is not None else "model",
        },
    )
    images = Path(images_dir) if images_dir is not None else None
    if answers is None and images is None:
        raise ConfigError("POPE needs --images DIR to ask the model (or --answers to score existing answers)")
    samples = [
        Sample(
            key=f"{split}/{q.question_id}",
            meta={
                "split": split,
                "question_id": q.question_id,
                "image": q.image,
                "question": q.text,
                "label": q.label,
                # scored answers are part of the sample's identity (resume checks it)
                **({"answer": answers[split][q.question_id]} if answers is not None else {}),
            },
            image_path=images / q.image if answers is None else None,
            prompt=apply_template(template, q.text),
            text=answers[split][q.question_id] if answers is not None else None,
        )
        for split, questions in splits.items()
        for q in questions
    ]

    def finish(_sample: Sample, text: str) -> dict[str, Any]:
        return {"answer": text, "pred": answer_parser(text), "parser": answer_parser.to_dict()}

    ctx = ctx or dist_context()
    records = run_samples(
        samples, out_dir, generate_fn, finish,
        batch_size=batch_size, ctx=ctx, progress=progress, retry_errors=retry_errors,
        telemetry=run_info.get("method_stats"),
    )  # fmt: skip
    if records is None:
        return None
    stale = [r for r in records if "error" not in r and r.get("parser") != answer_parser.to_dict()]
    if stale:  # resumed or re-scored under another parser: keep samples.jsonl consistent
        logger.info("re-parsing %d stored answers with %s", len(stale), answer_parser.name)
        for r in stale:
            r.update(pred=answer_parser(r["answer"]), parser=answer_parser.to_dict())
        replace_records(out_dir, stale)
    results = {
        "task": "pope",
        "splits": {},
        **score_pope_records(records, parser, bootstrap=bootstrap),
        "template": template,
        "model_id": run_info.pop("model_id", None),
        "methods": run_info.pop("methods", []),
        **run_info,
    }
    if ctx.is_sharded:  # the only field that differs from a single-process run
        results["num_processes"] = ctx.world_size
    if results.get("limited"):  # a --limit run left items out: never complete
        results["complete"] = False
    write_results(out_dir, results)
    write_report(out_dir, results)
    return results


def score_pope_records(
    records: Sequence[dict[str, Any]], parser: str = "pope_official", *, bootstrap: BootstrapSpec | None = None
) -> dict[str, Any]:
    """Compute per-split POPE metrics, with bootstrap intervals, from per-sample records.

    Answers are re-parsed with ``parser`` from the raw ``answer`` text, so a resumed or
    re-scored run never mixes parsers. Error records are excluded from the metrics and
    counted in ``n_errors`` (per split and in total). Every ratio metric of a split gets
    ``ci[metric] = [low, high]`` and ``mean_f1`` gets ``mean_f1_ci``: seeded percentile
    bootstrap over images (``bootstrap`` in the result records resamples and seed).
    """
    spec = bootstrap or BootstrapSpec()
    answer_parser = get_parser(parser)
    by_split: dict[str, list[dict]] = {}
    for rec in records:
        by_split.setdefault(rec["split"], []).append(rec)
    splits: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []
    for split, recs in by_split.items():
        ok = [r for r in recs if "error" not in r]
        bad = [r for r in recs if "error" in r]
        preds = [answer_parser(r["answer"]) for r in ok]
        metrics = pope_metrics(preds, [r["label"] for r in ok])
        metrics["n_errors"] = len(bad)
        splits[split] = metrics
        errors += [{"key": r["key"], "error": r["error"]} for r in bad]
    scored = [{**r, "pred": answer_parser(r["answer"])} for r in records if "error" not in r]
    ci, mean_ci, n_images = pope_intervals(scored, list(splits), spec)
    for split, metrics in splits.items():
        metrics["ci"] = ci[split]
    if errors:
        logger.warning("POPE: %d samples failed and are not in the metrics (first: %s)", len(errors), errors[0])
    return {
        "splits": splits,
        "mean_f1": mean_f1(splits),
        "mean_f1_ci": mean_ci,
        "bootstrap": spec.to_dict(n_images),
        "parser": answer_parser.to_dict(),
        "metric_version": POPE_METRIC_VERSION,
        "n_samples": len(records),
        "n_errors": len(errors),
        "complete": not errors,
        "errors": errors[:20],
    }
