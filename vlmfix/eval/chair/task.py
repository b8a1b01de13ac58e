"""Run CHAIR: score a captions file, or caption images with a model and score them."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError, DataError
from vlmfix.eval.bootstrap import BootstrapSpec
from vlmfix.eval.chair.ground_truth import GroundTruth
from vlmfix.eval.chair.scorer import (
    CHAIR_METRIC_VERSION,
    DEFAULT_NORMALIZER,
    chair_intervals,
    chair_metrics,
    check_normalizer,
    score_caption,
)
from vlmfix.eval.records import read_records
from vlmfix.eval.report import captions_html, write_report, write_results
from vlmfix.eval.runner import DistContext, GenerateFn, Sample, check_run_config, dist_context, run_samples

__all__ = [
    "DEFAULT_PROMPT",
    "IMAGE_SUFFIXES",
    "DEDUPE_CHOICES",
    "caption_samples",
    "image_samples",
    "run_chair",
]

logger = logging.getLogger(__name__)

#: The prompt of the OPERA / LLaVA CHAIR protocol.
DEFAULT_PROMPT = "Please describe this image in detail."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_TEXT_KEYS = ("caption", "text")
#: ``dedupe`` choices of :func:`caption_samples`: None (repeats are an error), keep first, keep last.
DEDUPE_CHOICES = (None, "first", "last")
_PATH_KEYS = ("path", "image", "file_name")


def caption_samples(captions_file: str | os.PathLike, gt: GroundTruth, *, dedupe: str | None = None) -> list[Sample]:
    """Read a captions file into samples that need no generation.

    The file is JSON lines or one JSON array of objects. Each record holds ``image_id``
    or an image ``path`` (also ``image`` / ``file_name``) and the caption as ``caption``
    or ``text``. An empty caption is a caption (it counts in CHAIR_s's denominator and
    is reported); an unknown image id becomes an error record of that sample.

    Args:
        captions_file: the file.
        gt: ground truth, used to resolve image ids.
        dedupe: what to do when an image has more than one caption: ``None`` (default)
            raises :class:`DataError` naming both lines; ``"first"`` / ``"last"`` keeps
            that caption of each image and logs how many were dropped.

    Raises:
        DataError: a malformed record, a record without caption or image reference
            (naming ``file:line``), or a repeated image without ``dedupe``.
    """
    if dedupe not in DEDUPE_CHOICES:
        raise ConfigError(f"dedupe must be one of {list(DEDUPE_CHOICES)}, got {dedupe!r}")
    path = Path(captions_file)
    samples: list[Sample] = []
    first_line: dict[Any, tuple[int, int]] = {}  # image -> (line, index in samples)
    dropped = 0
    for i, (lineno, rec) in enumerate(read_records(path, "captions file")):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object with 'image_id' and 'caption', got {type(rec).__name__}")
        text_key = next((k for k in _TEXT_KEYS if k in rec), None)
        if text_key is None or not isinstance(rec[text_key], str):
            raise DataError(f"{where}: needs a string 'caption' or 'text' field")
        ref_path = next((rec[k] for k in _PATH_KEYS if k in rec), None)
        if "image_id" not in rec and ref_path is None:
            raise DataError(f"{where}: needs 'image_id' or an image 'path'")
        # The caption is part of the sample's identity: resuming with another file is refused.
        meta: dict[str, Any] = {"image_id": rec.get("image_id"), "image": ref_path, "caption": rec[text_key]}
        error = None
        try:
            meta["image_id"] = gt.resolve(rec.get("image_id"), ref_path)
        except DataError as exc:
            error = str(exc)
        ident = meta["image_id"] if error is None else ("unresolved", str(rec.get("image_id")), str(ref_path))
        sample = Sample(key=str(i), meta=meta, text=rec[text_key], error=error)
        if ident in first_line:
            prev_line, prev_index = first_line[ident]
            if dedupe is None:
                name = meta["image_id"] if error is None else rec.get("image_id", ref_path)
                raise DataError(
                    f"{where}: image {name} already has a caption on line {prev_line}; CHAIR scores one "
                    "caption per image. Remove the repeat, or pass --dedupe first|last (dedupe='first'|'last')"
                )
            dropped += 1
            if dedupe == "last":
                samples[prev_index] = sample
                first_line[ident] = (lineno, prev_index)
            continue
        first_line[ident] = (lineno, len(samples))
        samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no captions found; expected JSON lines or a JSON array of {{image_id, caption}}")
    if dropped:
        logger.warning("%s: dropped %d repeated captions of the same image (dedupe=%s)", path, dropped, dedupe)
    return samples


def image_samples(
    images_dir: str | os.PathLike,
    gt: GroundTruth,
    *,
    n: int | None = 500,
    seed: int = 0,
    image_ids: Sequence[int] | None = None,
    prompt: str = DEFAULT_PROMPT,
) -> list[Sample]:
    """Pick images to caption: the given ``image_ids``, else ``n`` seeded random files.

    Images whose id is not in the ground truth become error records.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise DataError(f"images folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if image_ids is not None:
        by_id: dict[int, Path] = {}
        for p in files:
            try:
                by_id.setdefault(gt.resolve(path=p.name), p)
            except DataError:
                continue
        chosen = []
        for iid in image_ids:
            if iid in by_id:
                chosen.append((by_id[iid], iid, None))
            else:
                chosen.append((folder / f"<image {iid}>", iid, f"no image file for image id {iid} in {folder}"))
    else:
        if not files:
            raise DataError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        if n is not None and n < len(files):
            files = random.Random(seed).sample(files, n)
        chosen = []
        for p in files:
            try:
                chosen.append((p, gt.resolve(path=p.name), None))
            except DataError as exc:
                chosen.append((p, None, str(exc)))
    return [
        Sample(key=p.name, meta={"image_id": iid, "image": p.name}, image_path=p, prompt=prompt, error=err)
        for p, iid, err in chosen
    ]


def run_chair(
    samples: Sequence[Sample],
    gt: GroundTruth,
    out_dir: str | os.PathLike,
    generate_fn: GenerateFn | None = None,
    *,
    normalizer: str = DEFAULT_NORMALIZER,
    batch_size: int = 1,
    run_info: dict[str, Any] | None = None,
    ctx: DistContext | None = None,
    progress: bool = False,
    bootstrap: BootstrapSpec | None = None,
    retry_errors: bool = True,
) -> dict[str, Any] | None:
    """Caption (if needed) and score samples with CHAIR; write the run folder.

    Args:
        samples: from :func:`caption_samples` (existing captions) or
            :func:`image_samples` (to be captioned by ``generate_fn``).
        gt: ground truth from :func:`load_ground_truth`.
        out_dir: run folder: ``samples.jsonl``, ``results.json``, ``report.md``,
            ``captions.html``.
        generate_fn: ``(images, prompts) -> captions``; only needed for image samples.
        normalizer: CHAIR normalizer (:data:`NORMALIZERS`).
        batch_size: prompts per ``generate_fn`` call.
        run_info: model id, methods, generation settings, metadata to record.
        ctx: distributed context (default: from the environment).
        progress: show a progress bar.
        bootstrap: resamples / seed of the 95% intervals over images (default
            :class:`BootstrapSpec`: 1000 resamples, seed 0).
        retry_errors: on resume, run again samples whose stored record is an error.

    Returns:
        The results dict on rank 0, None on other ranks.
    """
    check_normalizer(normalizer)
    if not samples:
        raise ConfigError("no captions or images to evaluate")
    run_info = dict(run_info or {})
    captioning = any(s.text is None and s.error is None for s in samples)
    check_run_config(
        out_dir,
        {
            "task": "chair",
            "normalizer": normalizer,
            "source": "model" if captioning else "captions",
            "model_id": run_info.get("model_id"),
            "methods": run_info.get("methods", []),
            "generation": run_info.get("generation", {}),
            "model_resolved": run_info.get("model_resolved"),
            "dtype": run_info.get("dtype"),
        },
    )

    def finish(sample: Sample, text: str) -> dict[str, Any]:
        score = score_caption(text, gt.objects[sample.meta["image_id"]], normalizer)
        if not text.strip():
            # Every reference counts an empty caption as a caption without hallucination.
            logger.warning("sample %s: empty caption; scored as a caption without mentions", sample.key)
            return {"caption": text, "empty": True, **score.to_dict()}
        return {"caption": text, **score.to_dict()}

    ctx = ctx or dist_context()
    records = run_samples(
        samples, out_dir, generate_fn, finish,
        batch_size=batch_size, ctx=ctx, progress=progress, retry_errors=retry_errors,
        telemetry=run_info.get("method_stats"),
    )  # fmt: skip
    if records is None:
        return None
    ok = [r for r in records if "error" not in r]
    errors = [{"key": r["key"], "error": r["error"]} for r in records if "error" in r]
    if errors:
        logger.warning("CHAIR: %d samples failed and are not in the metrics (first: %s)", len(errors), errors[0])
    spec = bootstrap or BootstrapSpec()
    metrics = chair_metrics(ok)
    metrics["n_errors"] = len(errors)
    empty = [r["key"] for r in ok if r.get("empty")]
    metrics["n_empty_captions"] = len(empty)
    if empty:
        logger.warning("CHAIR: %d empty captions (counted as captions without mentions)", len(empty))
    metrics["ci"], n_images = chair_intervals(ok, spec)
    results = {
        "task": "chair",
        "metrics": metrics,
        "normalizer": normalizer,
        "metric_version": CHAIR_METRIC_VERSION,
        "ground_truth": gt.source,
        "n_samples": len(records),
        "n_errors": len(errors),
        "complete": not errors,
        "errors": errors[:20],
        "empty_captions": empty[:20],
        "bootstrap": spec.to_dict(n_images),
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
    captions_html(records, Path(out_dir) / "captions.html", title=f"CHAIR captions — {Path(out_dir).name}")
    return results
