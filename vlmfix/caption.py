"""Batch captioning of image folders: ``vlmfix caption``.

Each image becomes one JSON line in the output file, written as soon as its batch is
done. Bad files (corrupt, truncated, not an image, decompression bombs) become error
records and the run goes on. ``--resume`` skips every image already captioned in the
file (matched by resolved path, so ``./a.png`` and ``/abs/a.png`` are one image), so an
interrupted run (Ctrl-C, kill) continues without duplicating or dropping images. Error
records are retried on resume (a repaired file gets its caption) unless
``retry_errors=False``. Resuming under other settings (model, dtype, method configs,
prompt, decoding) is refused, naming the setting, so one file never mixes two runs.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vlmfix._prefetch import prefetched
from vlmfix.errors import ConfigError, DataError
from vlmfix.io import JsonlWriter, drop_records, read_jsonl, repair_jsonl
from vlmfix.shard import DistContext, ShardedRun, merge_records, part_files, shard_items, write_records

__all__ = [
    "IMAGE_EXTENSIONS",
    "find_images",
    "load_image",
    "to_rgb",
    "caption_files",
    "check_fresh_output",
    "method_warnings",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, image extensions only) into a sorted list,
    de-duplicated by resolved path (the user's spelling of the first mention is kept).
    A file named explicitly is kept whatever its extension (it becomes an error record
    if it is not an image).

    Raises:
        DataError: a given path does not exist.
    """
    out: dict[str, Path] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    out.setdefault(resolved(f), f)
        elif p.is_file():
            out.setdefault(resolved(p), p)
        else:
            raise DataError(f"path {str(p)!r} does not exist; pass image files or folders")
    return list(out.values())


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open and fully decode an image as 8-bit RGB (see :func:`to_rgb` for the modes).

    Raises:
        DataError: unreadable, truncated, not an image, or more than ``max_pixels``
            pixels (the message says how to raise the limit).
    """
    from PIL import Image, UnidentifiedImageError

    def too_big(pixels: str) -> DataError:
        return DataError(
            f"{path}: {pixels} pixels exceeds the limit of {max_pixels} (possible decompression bomb); "
            "if the image is genuine, raise the limit: vlmfix caption --max-pixels N "
            "(Python: vlmfix.caption.load_image(path, max_pixels=N))"
        )

    # PIL refuses images above 2 x MAX_IMAGE_PIXELS on its own; let max_pixels decide.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise too_big(f"{w}x{h} = {w * h}")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            return to_rgb(im)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        import re

        found = re.findall(r"\d+", str(exc))
        raise too_big(found[0] if found else "its") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_rgb(im):
    """Convert a decoded PIL image of any mode to 8-bit RGB, scaling (never clipping)
    high-bit-depth data.

    - ``I;16*`` (16-bit, e.g. 16-bit grayscale PNG): value / 257, so 65535 -> 255.
    - ``I`` (32-bit int): taken as 16-bit data (/ 257) when any value exceeds 255,
      else as 8-bit; negative values and values above 65535 are scaled from the
      image's own range.
    - ``F`` (float): values in [0, 1] are scaled by 255; in [0, 255] kept; larger
      ranges scaled like ``I``.
    - ``LAB``: a colorimetric CIELAB -> sRGB transform (PIL's plain ``convert`` does not
      convert LAB colours). ``La``: its luminance band.
    - every other mode (1, L, P, PA, LA, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, HSV): PIL's
      ``convert("RGB")``.
    """
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif lo < 0 or hi > 65535:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        elif mode == "F" and hi <= 1.0:
            a = a * 255.0
        elif hi > 255:
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(im, transform)
    if mode == "La":
        return im.getchannel(0).convert("RGB")
    return im.convert("RGB")


def resolved(path: str | os.PathLike) -> str:
    """The identity of an image in an output file: its absolute, symlink-free path."""
    return str(Path(path).resolve())


def method_warnings(stats: dict[str, Any]) -> list[str]:
    """The ``no_effect`` notes of methods' telemetry (e.g. VAR found no sink at all)."""
    return [
        f"{name}: {s['no_effect']}" for name, s in (stats or {}).items() if isinstance(s, dict) and s.get("no_effect")
    ]


def _norm(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _first_difference(key: str, old: Any, new: Any) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if k in old and k in new:
                found = _first_difference(f"{key}.{k}", old[k], new[k])
                if found:
                    return found
        return None
    return None if old == new else (key, old, new)


def _check_settings(out_path: Path, records: list[dict], settings: dict[str, Any]) -> None:
    """Refuse to append to a file made under other settings, naming the first difference
    (settings a record lacks were not recorded by the vlmfix that wrote it)."""
    want = _norm(settings)
    for rec in records:
        if "error" in rec:
            continue
        for key, value in want.items():
            found = _first_difference(key, _norm(rec[key]), value) if key in rec else None
            if found:
                name, was, now = found
                raise ConfigError(
                    f"{out_path} was made with other settings: {name} is {was!r} there, {now!r} now; "
                    "resume with the same settings, or write to another file with --out"
                )


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _record_key(rec: dict) -> str | None:
    if "path" not in rec:
        return None
    return rec.get("resolved_path") or resolved(rec["path"])  # older files: path only


def check_fresh_output(out_path: Path, resume: bool) -> None:
    """Without ``resume`` the output must hold nothing yet: no records, no part files.

    Raises:
        DataError: it does (the message says to pass --resume or choose another --out).
    """
    if resume:
        return
    if out_path.exists() and out_path.stat().st_size > 0:
        raise DataError(f"{out_path} already exists; pass --resume to continue it, or choose another --out")
    parts = part_files(out_path)
    if parts:
        raise DataError(
            f"{out_path} has part files of an interrupted multi-process run ({parts[0].name}, ...); "
            "pass --resume to continue it, or choose another --out"
        )


def _fold_leftovers(out_path: Path, files: list[Path]) -> None:
    """Move the records of an interrupted launch's part files into ``out_path``: after its
    own records, in the order of ``files`` (as one process would have written them),
    nothing twice; then delete the parts."""
    from vlmfix.io import OutputLock

    leftovers = part_files(out_path)
    if not leftovers:
        return
    for p in leftovers:  # a live process still appending to one would lose records
        OutputLock(p).acquire().release()
    repair_jsonl(out_path)
    own = list(read_jsonl(out_path, strict=False)) if out_path.exists() else []
    recs = merge_records([own, *(read_jsonl(p, strict=False) for p in leftovers)], _record_key)
    mine = {_record_key(r) for r in own}
    position = {resolved(f): i for i, f in enumerate(files)}
    new = sorted((r for k, r in recs.items() if k not in mine), key=lambda r: position.get(_record_key(r), len(files)))
    logger.warning("%s: folding %d part files of an interrupted multi-process run into it", out_path, len(leftovers))
    write_records(out_path, [*(r for k, r in recs.items() if k in mine), *new])
    for p in leftovers:
        p.unlink()


def caption_files(
    model,
    processor,
    files: list[Path],
    out_path: str | os.PathLike,
    *,
    prompt: str,
    methods: list,
    metadata: dict[str, Any],
    settings: dict[str, Any] | None = None,
    batch_size: int = 8,
    resume: bool = False,
    retry_errors: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    generate_kwargs: dict[str, Any] | None = None,
    ctx: DistContext | None = None,
) -> dict[str, int]:
    """Caption ``files`` into the JSON-lines file ``out_path``.

    Hold :class:`vlmfix.io.OutputLock` on ``out_path`` around the call when other
    processes may write the same file (the CLI does; under a launcher, rank 0 only).

    Args:
        model, processor: from :func:`vlmfix.load`.
        files: image paths (see :func:`find_images`).
        out_path: output file; must not hold records unless ``resume`` is set.
        prompt: the user prompt for every image.
        methods: method configs.
        metadata: fields copied into every record (model id, method configs, versions...).
        settings: fields copied into every record that must match on resume (resolved
            model, dtype, methods, generation settings); ``prompt`` is always checked.
        batch_size: images per forward.
        resume: skip images already captioned in ``out_path`` (by resolved path).
        retry_errors: on resume, caption again the images that have an error record
            (the old record is replaced); False keeps error records as final.
        max_pixels: larger images become error records.
        progress: show a progress bar on stderr.
        generate_kwargs: passed to :func:`vlmfix.generate`.
        ctx: the processes of a launch to split the images over
            (:func:`vlmfix.shard.dist_context`; default: this process alone). Each rank
            captions every ``world_size``-th image still to do into its part file and rank
            0 merges them into ``out_path``, in the order one process writes.

    Returns:
        Counts: ``{"done": captions written, "errors": error records written,
        "skipped": already done, "retried": error records replaced}``; with several
        processes rank 0 counts every rank's records, the others their own.

    Raises:
        DataError: ``out_path`` holds records and ``resume`` is not set.
        ConfigError: ``resume`` under settings other than the file's.
        ShardError: another process of the launch failed.
    """
    from tqdm.auto import tqdm

    from vlmfix.generation import generate

    ctx = ctx or DistContext()
    out_path = Path(out_path)
    settings = {"prompt": prompt, **(settings or {})}
    wanted = {resolved(f) for f in files}
    retried = 0

    def prepare() -> None:  # one process, before any rank reads the file (or writes a part)
        nonlocal retried
        check_fresh_output(out_path, resume)
        _fold_leftovers(out_path, files)
        if resume and repair_jsonl(out_path):
            logger.warning("%s: removed a partial last line left by an interrupted run", out_path)
        old = list(read_jsonl(out_path, strict=False)) if resume and out_path.exists() else []
        _check_settings(out_path, old, settings)
        only_errors: dict[str, bool] = {}  # resolved path -> only error records so far
        for rec in old:
            key = _record_key(rec)
            if key is not None:
                only_errors[key] = only_errors.get(key, True) and "error" in rec
        if retry_errors:
            failed = {k for k, is_error in only_errors.items() if is_error and k in wanted}
            if failed:
                retried = drop_records(out_path, lambda r: "error" in r and _record_key(r) in failed)

    with ShardedRun(out_path, ctx) as run:
        run.start(prepare)
        done = {k for r in read_jsonl(out_path, strict=False) if (k := _record_key(r))} if out_path.exists() else set()
        todo = [f for f in files if resolved(f) not in done]
        mine = shard_items(todo, ctx.rank, ctx.world_size)
        counts = {"done": 0, "errors": 0, "skipped": len(files) - len(todo), "retried": retried}
        generate_kwargs = dict(generate_kwargs or {})
        bar = tqdm(total=len(mine), disable=not progress, unit="img", desc="captioning")
        with JsonlWriter(run.part) as writer:
            def read(batch: list[Path]) -> list[Any]:
                out = []
                for path in batch:
                    try:
                        out.append(load_image(path, max_pixels))
                    except DataError as exc:
                        out.append(exc)
                return out

            # the next batch's images are read while this one is on the model
            for batch, loaded in prefetched(list(_batches(mine, batch_size)), read):
                records: list[dict[str, Any] | None] = []
                images, good = [], []
                for path, image in zip(batch, loaded):
                    if not isinstance(image, DataError):
                        images.append(image)
                        good.append(path)
                        records.append(None)  # its caption, once generated
                    else:
                        records.append(
                            {
                                "path": str(path),
                                "resolved_path": resolved(path),
                                "error": str(image),
                                "error_type": "bad_image",
                                **settings,
                            }
                        )
                if good:
                    t0 = time.perf_counter()
                    result = generate(model, processor, images, [prompt] * len(good), methods, **generate_kwargs)
                    seconds = (time.perf_counter() - t0) / len(good)
                    stats = _norm(result.stats or {})
                    flags = method_warnings(stats)
                    captions = iter(zip(good, result.texts, result.token_ids))
                    for i, rec in enumerate(records):
                        if rec is not None:
                            continue
                        path, text, ids = next(captions)
                        records[i] = {
                            "path": str(path),
                            "resolved_path": resolved(path),
                            "text": text,
                            "num_tokens": len(ids),
                            "seconds": round(seconds, 4),
                            **settings,
                            **metadata,
                            "method_stats": stats,  # telemetry of this image's batch
                            **({"method_warnings": flags} if flags else {}),
                        }
                # In image order, so every batching (and every split over processes) gives
                # one file order: the order of ``files``.
                for rec in records:
                    writer.write(rec)
                    counts["errors" if "error" in rec else "done"] += 1
                bar.update(len(batch))
        bar.close()

        def merge(parts: list[Path]) -> None:
            # Rank 0: the file's records, then every new record in the order of ``files``.
            position = {resolved(f): i for i, f in enumerate(todo)}
            new = merge_records((read_jsonl(p, strict=False) for p in parts if p.exists()), _record_key)
            new = {k: r for k, r in new.items() if k not in done}
            old = list(read_jsonl(out_path, strict=False)) if out_path.exists() else []
            ordered = sorted(new.values(), key=lambda r: position.get(_record_key(r), len(todo)))
            write_records(out_path, [*old, *ordered])
            counts["errors"] = sum(1 for r in new.values() if "error" in r)
            counts["done"] = len(new) - counts["errors"]

        run.finish(merge if ctx.is_sharded else None)
    return counts
