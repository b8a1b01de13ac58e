"""Build POPE questions from COCO-format instance annotations.

POPE (Li et al., EMNLP 2023, https://arxiv.org/abs/2305.10355): per image, the first
``per_image`` (3) ground-truth objects are positive questions, and each is followed by
one negative question about an object that is not in the image:

- ``random``: draw a category uniformly; redraw until it is neither in the image nor
  already asked about for this image;
- ``popular``: the most frequent category (number of images that contain it) that is
  neither in the image nor already asked about;
- ``adversarial``: the category that co-occurs most often with that positive object
  (number of images holding both; ties broken by frequency, then name), neither in the
  image nor already asked about.

"First objects" are an image's distinct categories in annotation-id order. Images with
fewer than ``per_image`` distinct categories are skipped. With the same annotations and
seed, the three splits use the same images and the same positive questions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
from collections import Counter
from itertools import combinations
from pathlib import Path

from vlmfix.errors import ConfigError, DataError
from vlmfix.eval.pope.data import SPLITS, PopeQuestion
from vlmfix.io import read_json

__all__ = ["build_questions", "CocoObjects", "load_coco_objects"]

logger = logging.getLogger(__name__)


class CocoObjects:
    """Per-image ordered category lists plus the statistics POPE samples from."""

    def __init__(self, objects: dict[int, list[str]], file_names: dict[int, str], categories: list[str]):
        self.objects = objects
        self.file_names = file_names
        self.categories = sorted(categories)
        self.frequency: Counter[str] = Counter(c for cats in objects.values() for c in set(cats))
        self.cooccur: Counter[tuple[str, str]] = Counter()
        for cats in objects.values():
            for a, b in combinations(sorted(set(cats)), 2):
                self.cooccur[(a, b)] += 1
                self.cooccur[(b, a)] += 1


def load_coco_objects(instances_file: str | os.PathLike) -> CocoObjects:
    """Read a COCO instances file with pycocotools into :class:`CocoObjects`."""
    from pycocotools.coco import COCO  # lazy: only the builder needs it

    path = Path(instances_file)
    data = read_json(path, missing=f"COCO instances file {path} does not exist")
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise DataError(f"{path}: not a COCO instances file (needs 'images', 'annotations', 'categories')")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    file_names = {img["id"]: img.get("file_name", str(img["id"])) for img in coco.loadImgs(coco.getImgIds())}
    objects: dict[int, list[str]] = {}
    for ann_id in sorted(coco.getAnnIds()):
        ann = coco.anns[ann_id]
        if ann["category_id"] not in names:
            raise DataError(f"{path}: annotation {ann_id} has unknown category_id {ann['category_id']}")
        cats = objects.setdefault(ann["image_id"], [])
        name = names[ann["category_id"]]
        if name not in cats:
            cats.append(name)
    return CocoObjects(objects, file_names, list(names.values()))


def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def _question(qid: int, image: str, name: str, label: str) -> PopeQuestion:
    return PopeQuestion(qid, image, f"Is there {_article(name)} {name} in the image?", label)


def build_questions(
    annotations: str | os.PathLike | CocoObjects,
    split: str,
    *,
    n_images: int = 500,
    per_image: int = 3,
    seed: int = 0,
) -> list[PopeQuestion]:
    """Build one POPE split from COCO instance annotations.

    Args:
        annotations: a COCO ``instances_*.json`` file or loaded :class:`CocoObjects`.
        split: "random", "popular" or "adversarial".
        n_images: images to sample (all eligible images if fewer exist, with a warning).
        per_image: positive questions per image; each is followed by one negative.
        seed: seeds the image sample and the random negatives.

    Returns:
        ``n_images * per_image * 2`` questions, ids from 1, ordered image by image as
        positive, negative, positive, negative, ...

    Example:
        >>> qs = build_questions("instances_val2014.json", "adversarial")  # doctest: +SKIP
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown POPE split {split!r}; choose one of {list(SPLITS)}")
    if n_images < 1 or per_image < 1:
        raise ConfigError(f"n_images and per_image must be >= 1, got {n_images}, {per_image}")
    coco = annotations if isinstance(annotations, CocoObjects) else load_coco_objects(annotations)
    eligible = sorted(i for i, cats in coco.objects.items() if len(cats) >= per_image)
    if len(eligible) < n_images:
        logger.warning(
            "POPE builder: only %d images have >= %d objects; using all of them instead of %d",
            len(eligible),
            per_image,
            n_images,
        )
        n_images = len(eligible)
    if n_images == 0:
        raise DataError(f"no image has {per_image} or more annotated categories; cannot build POPE")
    images = random.Random(seed).sample(eligible, n_images)
    rng = random.Random(f"{seed}/negatives")
    by_frequency = sorted(coco.categories, key=lambda c: (-coco.frequency[c], c))
    questions: list[PopeQuestion] = []
    for image_id in images:
        present = set(coco.objects[image_id])
        history: set[str] = set()
        for positive in coco.objects[image_id][:per_image]:
            negative = _negative(split, coco, by_frequency, positive, present, history, rng, image_id)
            history.add(negative)
            name = coco.file_names.get(image_id, str(image_id))
            questions.append(_question(len(questions) + 1, name, positive, "yes"))
            questions.append(_question(len(questions) + 1, name, negative, "no"))
    return questions


def _negative(split, coco, by_frequency, positive, present, history, rng, image_id) -> str:
    allowed = [c for c in coco.categories if c not in present and c not in history]
    if not allowed:
        raise DataError(f"image {image_id}: every category is present or used; no negative left")
    if split == "random":
        while True:  # redraw until new, as POPE does
            pick = rng.choice(coco.categories)
            if pick not in present and pick not in history:
                return pick
    if split == "popular":
        return next(c for c in by_frequency if c not in present and c not in history)
    ranked = sorted(allowed, key=lambda c: (-coco.cooccur[(positive, c)], -coco.frequency[c], c))
    return ranked[0]
