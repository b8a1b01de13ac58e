"""CHAIR ground truth: which COCO categories each image holds.

Ground truth per image = categories of its instance annotations ∪ categories found in
its human captions by the same pipeline that scores generated captions (the definition
of the original CHAIR). It comes either from COCO annotation files (read with
pycocotools) or from a JSON file ``{image_id: [category, ...]}``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlmfix.errors import DataError
from vlmfix.eval.chair.scorer import DEFAULT_NORMALIZER, categories_in, check_normalizer
from vlmfix.eval.chair.vocab import COCO_CATEGORIES
from vlmfix.io import read_json

__all__ = ["GroundTruth", "load_ground_truth", "ground_truth_from_coco", "image_id_from_path"]

logger = logging.getLogger(__name__)

_KNOWN = frozenset(COCO_CATEGORIES)


@dataclass
class GroundTruth:
    """Per-image COCO categories, plus the file names the annotations know (if any)."""

    objects: dict[int, frozenset[str]]
    file_names: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.objects

    def __len__(self) -> int:
        return len(self.objects)

    def resolve(self, image_id: int | str | None = None, path: str | None = None) -> int:
        """Return the image id for a record that gives an id or an image path.

        Raises:
            DataError: the id / path cannot be mapped to an image of this ground truth.
        """
        if image_id is not None:
            try:
                iid = int(image_id)
            except (TypeError, ValueError):
                raise DataError(f"image_id {image_id!r} is not an integer COCO id") from None
        elif path is not None:
            name = Path(str(path)).name
            if name in self.file_names:
                iid = self.file_names[name]
            else:
                iid = image_id_from_path(name)
        else:
            raise DataError("record has neither 'image_id' nor 'path'/'image'; give one")
        if iid not in self.objects:
            raise DataError(
                f"image id {iid} is not in the ground truth ({self.source}); use annotations that cover this image"
            )
        return iid


_COCO_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d{4}_)?(\d+)$")


def image_id_from_path(path: str | os.PathLike) -> int:
    """Return the COCO image id of a COCO-style file name.

    Only ``COCO_<split><year>_<digits>`` (COCO 2014) and all-digit names (COCO 2017,
    ``000000310196.jpg``) carry an id. Other names (``IMG_0009.jpg``) are refused rather
    than read as an id from their digits; map them with annotations whose ``file_name``
    lists them, or give ``image_id`` in the captions file.

    Example:
        >>> image_id_from_path("val2014/COCO_val2014_000000310196.jpg")
        310196
    """
    m = _COCO_NAME.match(Path(path).stem)
    if m is None:
        raise DataError(
            f"cannot read an image id from file name {Path(path).name!r}: not a COCO-style name "
            "(COCO_val2014_000000310196.jpg or 000000310196.jpg); give image_id, or annotations whose "
            "file_name lists this file"
        )
    return int(m.group(1))


def load_ground_truth(source: str | os.PathLike, normalizer: str = DEFAULT_NORMALIZER) -> GroundTruth:
    """Load CHAIR ground truth from a JSON mapping or COCO annotation files.

    Args:
        source: either a JSON file ``{image_id: [category, ...]}``; or a COCO
            ``instances_*.json`` file (its sibling ``captions_<split>.json`` is used
            when present); or a directory holding ``instances_*.json`` and, optionally,
            ``captions_*.json`` files (all splits found are merged).
        normalizer: CHAIR normalizer used to read the human captions.

    Raises:
        DataError: missing files, malformed JSON, unknown categories.
    """
    src = Path(source)
    if src.is_dir():
        instances = sorted(src.glob("instances_*.json"))
        captions = sorted(src.glob("captions_*.json"))
        if not instances:
            raise DataError(
                f"{src}: no instances_*.json in this directory; pass the COCO annotations "
                "folder or a ground-truth JSON {image_id: [category, ...]}"
            )
        return ground_truth_from_coco(instances, captions, normalizer)
    data = read_json(src, missing=f"ground truth {src} does not exist")
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        caps = src.with_name(src.name.replace("instances_", "captions_"))
        captions = [caps] if caps != src and caps.exists() else []
        return ground_truth_from_coco([src], captions, normalizer)
    return _from_mapping(data, str(src))


def _from_mapping(data: object, source: str) -> GroundTruth:
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a JSON object {{image_id: [category, ...]}}, got {type(data).__name__}")
    objects: dict[int, frozenset[str]] = {}
    for key, cats in data.items():
        try:
            iid = int(key)
        except ValueError:
            raise DataError(f"{source}: key {key!r} is not an integer image id") from None
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise DataError(f"{source}: image {key}: expected a list of category names")
        unknown = set(cats) - _KNOWN
        if unknown:
            raise DataError(
                f"{source}: image {key}: unknown COCO categories {sorted(unknown)}; "
                "use the 80 COCO category names (e.g. 'dining table', 'tv')"
            )
        objects[iid] = frozenset(cats)
    return GroundTruth(objects, source=source)


def ground_truth_from_coco(
    instances_files: Sequence[str | os.PathLike],
    captions_files: Sequence[str | os.PathLike] = (),
    normalizer: str = DEFAULT_NORMALIZER,
) -> GroundTruth:
    """Build ground truth from COCO instance (and optionally caption) annotation files.

    Every image of the instance files is included, with an empty set when it has no
    instance annotation. Human captions add the categories they mention.
    """
    from pycocotools.coco import COCO  # lazy: only needed for this path

    check_normalizer(normalizer)
    objects: dict[int, set[str]] = {}
    file_names: dict[str, int] = {}
    for path in instances_files:
        coco = _load_coco(COCO, path)
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        bad = set(names.values()) - _KNOWN
        if bad:
            raise DataError(f"{path}: categories {sorted(bad)} are not COCO categories")
        for img in coco.loadImgs(coco.getImgIds()):
            objects.setdefault(img["id"], set())
            if "file_name" in img:
                file_names[img["file_name"]] = img["id"]
        for ann in coco.dataset.get("annotations", []):
            objects.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    for path in captions_files:
        coco = _load_coco(COCO, path)
        for img in coco.loadImgs(coco.getImgIds()):
            objects.setdefault(img["id"], set())
            if "file_name" in img:
                file_names[img["file_name"]] = img["id"]
        for ann in coco.dataset.get("annotations", []):
            objects.setdefault(ann["image_id"], set()).update(categories_in(ann["caption"], normalizer))
    source = ", ".join(str(p) for p in [*instances_files, *captions_files])
    logger.info("CHAIR ground truth: %d images from %s", len(objects), source)
    return GroundTruth({k: frozenset(v) for k, v in objects.items()}, file_names, source)


def _load_coco(coco_cls, path):
    path = Path(path)
    data = read_json(path, missing=f"COCO annotation file {path} does not exist")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path}: not a COCO annotation file (needs 'images' and 'annotations')")
    coco = coco_cls()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco
