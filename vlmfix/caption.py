"""Batch captioning of image folders: ``vlmfix caption``.

Each image becomes one JSON line in the output file, written as soon as its batch is
done. Bad files (corrupt, truncated, not an image, decompression bombs) become error
records and the run goes on. ``--resume`` skips every path already in the file, so an
interrupted run (Ctrl-C, kill) continues without duplicating or dropping images.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vlmfix.errors import DataError
from vlmfix.io import JsonlWriter, done_keys, repair_jsonl

__all__ = ["IMAGE_EXTENSIONS", "find_images", "load_image", "caption_files"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, image extensions only) into a sorted,
    de-duplicated list. A file named explicitly is kept whatever its extension (it
    becomes an error record if it is not an image).

    Raises:
        DataError: a given path does not exist.
    """
    out: dict[str, Path] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    out.setdefault(str(f), f)
        elif p.is_file():
            out.setdefault(str(p), p)
        else:
            raise DataError(f"path {str(p)!r} does not exist; pass image files or folders")
    return list(out.values())


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open and fully decode an image as RGB.

    Raises:
        DataError: unreadable, truncated, not an image, or more than ``max_pixels`` pixels.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise DataError(
                    f"{path}: {w}x{h} = {w * h} pixels exceeds --max-pixels {max_pixels} "
                    "(possible decompression bomb); raise --max-pixels if the image is genuine"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            return im.convert("RGB")
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def caption_files(
    model,
    processor,
    files: list[Path],
    out_path: str | os.PathLike,
    *,
    prompt: str,
    methods: list,
    metadata: dict[str, Any],
    batch_size: int = 8,
    resume: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    generate_kwargs: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Caption ``files`` into the JSON-lines file ``out_path``.

    Args:
        model, processor: from :func:`vlmfix.load`.
        files: image paths (see :func:`find_images`).
        out_path: output file; must not hold records unless ``resume`` is set.
        prompt: the user prompt for every image.
        methods: method configs.
        metadata: fields copied into every record (model id, method configs, versions...).
        batch_size: images per forward.
        resume: skip paths already recorded in ``out_path``.
        max_pixels: larger images become error records.
        progress: show a progress bar on stderr.
        generate_kwargs: passed to :func:`vlmfix.generate`.

    Returns:
        Counts: ``{"done": captions written, "errors": error records, "skipped": already done}``.
    """
    from tqdm.auto import tqdm

    from vlmfix.generation import generate

    out_path = Path(out_path)
    if out_path.exists() and out_path.stat().st_size > 0 and not resume:
        raise DataError(f"{out_path} already exists; pass --resume to continue it, or choose another --out")
    if resume and repair_jsonl(out_path):
        logger.warning("%s: removed a partial last line left by an interrupted run", out_path)
    seen = done_keys(out_path, "path") if resume else set()
    todo = [f for f in files if str(f) not in seen]
    counts = {"done": 0, "errors": 0, "skipped": len(files) - len(todo)}
    generate_kwargs = dict(generate_kwargs or {})
    bar = tqdm(total=len(todo), disable=not progress, unit="img", desc="captioning")
    with JsonlWriter(out_path) as writer:
        for batch in _batches(todo, batch_size):
            images, good = [], []
            for path in batch:
                try:
                    images.append(load_image(path, max_pixels))
                    good.append(path)
                except DataError as exc:
                    writer.write({"path": str(path), "error": str(exc), "error_type": "bad_image"})
                    counts["errors"] += 1
                    bar.update(1)
            if not good:
                continue
            t0 = time.perf_counter()
            result = generate(model, processor, images, [prompt] * len(good), methods, **generate_kwargs)
            seconds = (time.perf_counter() - t0) / len(good)
            for path, text, ids in zip(good, result.texts, result.token_ids):
                writer.write(
                    {
                        "path": str(path),
                        "prompt": prompt,
                        "text": text,
                        "num_tokens": len(ids),
                        "seconds": round(seconds, 4),
                        **metadata,
                    }
                )
                counts["done"] += 1
            bar.update(len(good))
    bar.close()
    return counts
