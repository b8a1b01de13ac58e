"""Batched, resumable, data-parallel sample loop shared by POPE and CHAIR.

A run is a list of :class:`Sample` (a key, an image, a prompt). The loop

- skips samples whose key already has a record in the output folder (resume); error
  records are retried unless ``retry_errors=False`` (the new record replaces the old);
- holds :class:`vlmfix.io.OutputLock` on the folder (rank 0), so a second run on the
  same folder is refused with the holder's PID instead of duplicating work;
- under a launcher (``accelerate launch``, ``torchrun``; :func:`vlmfix.shard.dist_context`)
  splits the samples still to do over the ranks (every ``world_size``-th one each), so
  ranks never overlap, and each rank appends to its own part file
  (:mod:`vlmfix.shard` describes the protocol);
- loads images, calls ``generate_fn(images, prompts) -> texts`` batch by batch and
  appends one record per sample as soon as its batch finishes (:class:`vlmfix.io.JsonlWriter`:
  an interrupted run loses nothing and a restarted one duplicates nothing);
- turns a missing or unreadable image, or a sample marked bad beforehand (unknown image
  id), into a per-sample ``error`` record instead of a crash;
- on rank 0, once every rank is done, merges the part files into ``samples.jsonl`` in
  sample order, so a sharded run gives the same file as a single-process one; a failed
  rank stops the others with :class:`~vlmfix.errors.ShardError` and the next run resumes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError, DataError, StateError
from vlmfix.io import JsonlWriter, OutputLock, read_jsonl
from vlmfix.shard import DistContext, ShardedRun, dist_context, merge_records, part_files, shard_items, write_records

__all__ = [
    "Sample",
    "GenerateFn",
    "DistContext",
    "dist_context",
    "run_samples",
    "check_run_config",
    "replace_records",
    "add_telemetry",
    "merge_telemetry",
]

logger = logging.getLogger(__name__)

#: ``generate_fn(images, prompts) -> texts``, one text per prompt.
GenerateFn = Callable[[list[Any], list[str]], list[str]]

SAMPLES_FILE = "samples.jsonl"
RUN_CONFIG_FILE = "run_config.json"


@dataclass
class Sample:
    """One unit of work.

    Attributes:
        key: unique within the run; used to resume and to merge shards.
        meta: fields copied into the record (question id, label, image id, ...).
        image_path: image to load, or None when no image is needed.
        prompt: text prompt for ``generate_fn`` (ignored when ``text`` is given).
        text: an existing output; when set, nothing is generated for this sample.
        error: a problem known before generation (e.g. unknown image id); the sample
            becomes an error record.
    """

    key: str
    meta: dict[str, Any] = field(default_factory=dict)
    image_path: Path | None = None
    prompt: str = ""
    text: str | None = None
    error: str | None = None


def check_run_config(out_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """Record the settings that shape the samples; refuse to resume under others.

    Args:
        out_dir: the run folder.
        config: JSON-serialisable settings (model, methods, prompt template, decoding).

    Raises:
        ConfigError: ``out_dir`` holds samples made with different settings.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_CONFIG_FILE
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        # A setting the stored config lacks was not recorded by the vlmfix that wrote it.
        diff = sorted(k for k in config if old is not None and k in old and old[k] != config[k])
        if old is not None and diff:
            raise ConfigError(
                f"{out} holds samples made with different settings ({', '.join(diff)}); "
                "resume with the same settings or choose a new --out folder"
            )
        if old is not None:
            return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _leftover_parts(out: Path) -> list[Path]:
    """Part files of an interrupted launch: ``samples.jsonl.rank{r}-of-{n}.part.jsonl``, and
    ``samples.rank{r}.jsonl`` from vlmfix versions before them."""
    return [*part_files(out / SAMPLES_FILE), *sorted(out.glob("samples.rank*.jsonl"))]


def _key(rec: dict) -> str | None:
    return rec.get("key")


def _existing_records(out: Path, parts: Sequence[Path] = ()) -> dict[str, dict]:
    """The record of every key in ``samples.jsonl`` and ``parts``: the first good record,
    else the latest error (a retried sample has its old error record and, later, its new
    record)."""
    paths = [p for p in (out / SAMPLES_FILE, *parts) if p.exists()]
    return merge_records((read_jsonl(p, strict=False) for p in paths), _key)


def _fold_leftovers(out: Path) -> None:
    """Rank 0, before any rank reads: move the records of an interrupted launch's part
    files into ``samples.jsonl`` (nothing lost, nothing twice), then delete the parts."""
    leftovers = _leftover_parts(out)
    if not leftovers:
        return
    for p in leftovers:  # a live process still appending to one would lose records
        OutputLock(p).acquire().release()
    recs = _existing_records(out, leftovers)
    logger.info("folding %d part files of an interrupted launch into %s", len(leftovers), out / SAMPLES_FILE)
    write_records(out / SAMPLES_FILE, recs.values())
    for p in leftovers:
        p.unlink()


def _check_same_inputs(out: Path, samples: Sequence[Sample], done: dict[str, dict]) -> None:
    """Refuse to reuse a stored record whose inputs differ from this run's sample.

    Keys alone do not identify the work (POPE question ids restart at 1 in every file, a
    captions file is keyed by line number), so resuming with another question file, seed
    or captions file would otherwise score old answers against new labels.
    """
    for s in samples:
        rec = done.get(s.key)
        if rec is None:
            continue
        want = json.loads(json.dumps(s.meta, default=str))
        if s.text is None and s.error is None and "prompt" in rec:
            want["prompt"] = s.prompt
        for name, value in want.items():
            if rec.get(name) != value:
                raise ConfigError(
                    f"{out} already holds a record for sample {s.key!r} made from different input "
                    f"({name}: stored {rec.get(name)!r}, now {value!r}); resume with the same "
                    "questions / captions / seed, or choose a new --out folder"
                )


def _load_image(path: Path):
    """Open and fully decode an image as RGB; :class:`DataError` if it cannot be read."""
    try:
        from vlmfix.caption import load_image  # the core's loader: also guards decompression bombs
    except ImportError:
        load_image = None
    if load_image is not None:
        return load_image(path)
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def run_samples(
    samples: Sequence[Sample],
    out_dir: str | os.PathLike,
    generate_fn: GenerateFn | None,
    finish: Callable[[Sample, str], dict[str, Any]],
    *,
    batch_size: int = 1,
    ctx: DistContext | None = None,
    progress: bool = False,
    retry_errors: bool = True,
    telemetry: dict[str, Any] | None = None,
) -> list[dict] | None:
    """Run (or resume) ``samples`` and return every record in sample order.

    Args:
        samples: the work; keys must be unique.
        out_dir: the run folder (created).
        generate_fn: ``(images, prompts) -> texts``; may be None when every sample has
            ``text`` or ``error``.
        finish: turns a sample and its output text into the fields of its record
            (parsed answer, mentions, ...).
        batch_size: prompts per ``generate_fn`` call.
        ctx: distributed context (default: :func:`dist_context`).
        progress: show a tqdm bar (rank 0).
        retry_errors: run again the samples whose stored record is an error (a fixed
            image folder, a repaired file); False keeps error records as final.
        telemetry: this rank's method telemetry, filled by ``generate_fn`` with
            :func:`add_telemetry`; on rank 0 of a sharded run it is replaced, in place,
            by every rank's (:func:`merge_telemetry`).

    Returns:
        On rank 0, the records (one per sample, in order; failed samples have an
        ``error`` field). On other ranks, None (after rank 0 has written them).

    Raises:
        DataError: repeated keys, or ``generate_fn`` returned the wrong number of texts.
        StateError: another process is running on ``out_dir``.
        ShardError: another rank of the launch failed.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise DataError("sample keys repeat; every sample needs a unique key")
    ctx = ctx or dist_context()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out, folder=True) if ctx.is_main else None
    if lock is not None:
        lock.acquire()
    records: list[dict] | None = None
    try:
        with ShardedRun(out / SAMPLES_FILE, ctx) as run:
            run.start(prepare=lambda: _fold_leftovers(out))
            done = _existing_records(out)
            _check_same_inputs(out, samples, done)
            finished = {k for k, r in done.items() if "error" not in r or not retry_errors}
            todo = [s for s in samples if s.key not in finished]
            mine = shard_items(todo, ctx.rank, ctx.world_size)
            if done and ctx.is_main:
                retry = sum(1 for k in keys if k in done and k not in finished)
                logger.info(
                    "resuming: %d of %d samples already done%s",
                    len(finished & set(keys)),
                    len(keys),
                    f", retrying {retry} error records" if retry else "",
                )
            with JsonlWriter(run.part) as writer:
                _loop(mine, generate_fn, finish, writer, batch_size, progress and ctx.is_main)

            def merge(parts: list[Path]) -> None:
                nonlocal records
                records = _merge(out, samples, parts)

            run.finish(merge, payload=telemetry)
        if telemetry is not None and ctx.is_sharded and ctx.is_main:
            merged = merge_telemetry(run.payloads)
            telemetry.clear()
            telemetry.update(merged)
        return records
    finally:
        if lock is not None:
            lock.release()


def _load_batch(batch: Sequence[Sample]) -> list[tuple[Sample, str, Any]]:
    """Per sample: ``(sample, "record", final record)`` (a stored error, or an image that
    cannot be read), ``(sample, "text", text)`` (generated before) or ``(sample, "image",
    image or None)`` (to generate)."""
    out = []
    for s in batch:
        if s.error is not None:
            out.append((s, "record", _error_record(s, s.error)))
        elif s.text is not None:
            out.append((s, "text", s.text))
        elif s.image_path is not None and not Path(s.image_path).is_file():
            out.append((s, "record", _error_record(s, f"image file not found: {s.image_path}")))
        else:
            try:
                out.append((s, "image", _load_image(Path(s.image_path)) if s.image_path else None))
            except (DataError, OSError) as exc:
                out.append((s, "record", _error_record(s, f"cannot read image: {exc}")))
    return out


def _loop(mine, generate_fn, finish, writer, batch_size, progress) -> None:
    from vlmfix._prefetch import prefetched

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc="samples")
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    # the next batch's images are read while this one is on the model
    for batch, loaded in prefetched(batches, _load_batch):
        ready, images = [], []
        for s, kind, value in loaded:
            if kind == "record":
                writer.write(value)
            elif kind == "text":
                writer.write({"key": s.key, **s.meta, **finish(s, value)})
            else:
                ready.append(s)
                images.append(value)
        if ready:
            if generate_fn is None:
                raise ConfigError("samples need generation but no generate_fn / model was given")
            texts = list(generate_fn(images, [s.prompt for s in ready]))
            if len(texts) != len(ready):
                raise DataError(
                    f"generate_fn returned {len(texts)} texts for {len(ready)} prompts; "
                    "it must return exactly one text per prompt"
                )
            for s, text in zip(ready, texts, strict=True):
                writer.write({"key": s.key, **s.meta, "prompt": s.prompt, **finish(s, text)})
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()


def add_telemetry(telemetry: dict[str, Any], stats: dict[str, Any]) -> None:
    """Fold one batch's method telemetry into the run's: integer counters are summed over
    batches (``methods.<name>.sums``), every other value is the last batch's
    (``methods.<name>.last_batch``); ``no_effect`` notes are collected (``method_warnings``)."""
    from vlmfix.caption import method_warnings

    stats = json.loads(json.dumps(stats or {}, default=str))
    telemetry["batches"] = telemetry.get("batches", 0) + 1
    per = telemetry.setdefault("methods", {})
    for name, s in stats.items():
        if not isinstance(s, dict):
            continue
        entry = per.setdefault(name, {"sums": {}, "last_batch": {}})
        entry["last_batch"] = s
        for key, value in s.items():
            if isinstance(value, int) and not isinstance(value, bool):
                entry["sums"][key] = entry["sums"].get(key, 0) + value
    for note in method_warnings(stats):
        notes = telemetry.setdefault("method_warnings", [])
        if note not in notes:
            notes.append(note)


def merge_telemetry(per_rank: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """The telemetry of a sharded run from each rank's (:func:`add_telemetry`): batches and
    ``sums`` added up, ``last_batch`` of the lowest rank that has one, warnings joined."""
    out: dict[str, Any] = {}
    for tel in per_rank:
        if not tel:
            continue
        if "batches" in tel:
            out["batches"] = out.get("batches", 0) + tel["batches"]
        if "methods" in tel:
            out.setdefault("methods", {})
        for name, entry in (tel.get("methods") or {}).items():
            first = {"sums": {}, "last_batch": entry.get("last_batch", {})}
            mine = out.setdefault("methods", {}).setdefault(name, first)
            for key, value in (entry.get("sums") or {}).items():
                mine["sums"][key] = mine["sums"].get(key, 0) + value
        for note in tel.get("method_warnings", []):
            if note not in out.setdefault("method_warnings", []):
                out["method_warnings"].append(note)
    return out


def _error_record(s: Sample, message: str) -> dict:
    logger.warning("sample %s: %s", s.key, message)
    return {"key": s.key, **s.meta, "error": message}


def _merge(out: Path, samples: Sequence[Sample], parts: Sequence[Path]) -> list[dict]:
    """Write ``samples.jsonl`` from itself and this launch's ``parts``, in sample order;
    records of samples outside this invocation (e.g. an earlier run without --limit) are
    kept after them, unchanged. The parts are deleted by the caller afterwards."""
    recs = _existing_records(out, parts)
    missing = [s.key for s in samples if s.key not in recs]
    if missing:
        raise StateError(
            f"{len(missing)} samples have no record after the run (first: {missing[:3]}); "
            "re-run the same command to finish them"
        )
    keys = [s.key for s in samples]
    ordered = [recs[k] for k in keys]
    main = out / SAMPLES_FILE
    on_disk = [r.get("key") for r in read_jsonl(main, strict=False)] if main.exists() else []
    if any(p.exists() for p in parts) or on_disk[: len(keys)] != keys or len(on_disk) != len(recs):
        keyset = set(keys)
        write_records(main, [*ordered, *(r for k, r in recs.items() if k not in keyset)])
    return ordered


def replace_records(out_dir: str | os.PathLike, updated: Sequence[dict]) -> None:
    """Atomically rewrite ``samples.jsonl`` with ``updated`` records replacing those of the
    same key (used when answers are re-parsed with another parser)."""
    out = Path(out_dir)
    by_key = {r["key"]: r for r in updated}
    recs = list(read_jsonl(out / SAMPLES_FILE, strict=False))
    write_records(out / SAMPLES_FILE, [by_key.get(r.get("key"), r) for r in recs])
