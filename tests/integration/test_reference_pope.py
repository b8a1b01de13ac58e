"""POPE loader on every official question file (facts from shared/reference/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlmfix.eval.pope import load_questions, split_name


def reference_dir() -> Path:
    env = os.environ.get("VLMFIX_REFERENCE")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "reference"


POPE_DIR = reference_dir() / "pope"
pytestmark = pytest.mark.skipif(
    not POPE_DIR.is_dir(),
    reason=f"POPE reference files not found in {POPE_DIR} (default: ../shared/reference beside the "
    "checkout; set VLMFIX_REFERENCE=/path/to/reference to look elsewhere)",
)

FILES = {
    "coco-2023-11": ("coco_pope_{}.json", {"random": 3000, "popular": 3000, "adversarial": 3000}),
    "coco-llava-1.5": ("coco_pope_{}.json", {"random": 2910, "popular": 3000, "adversarial": 3000}),
    "aokvqa": ("aokvqa_pope_seem_{}.json", {"random": 3000, "popular": 3000, "adversarial": 3000}),
    "gqa": ("gqa_pope_seem_{}.json", {"random": 3000, "popular": 3000, "adversarial": 3000}),
}


def _load(folder: str, split: str):
    pattern, _ = FILES[folder]
    return load_questions(POPE_DIR / folder / pattern.format(split))


@pytest.mark.parametrize("folder", sorted(FILES))
@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_counts(folder, split):
    qs = _load(folder, split)
    assert len(qs) == FILES[folder][1][split]
    assert split_name(POPE_DIR / folder / FILES[folder][0].format(split)) == split
    assert len({q.image for q in qs}) == 500
    assert sum(q.label == "yes" for q in qs) == 1500
    if len(qs) == 3000:
        per_image = {}
        for q in qs:
            per_image[q.image] = per_image.get(q.image, 0) + 1
        assert set(per_image.values()) == {6}


def test_array_files_are_arrays_and_jsonl_files_are_lines():
    assert (POPE_DIR / "gqa" / "gqa_pope_seem_random.json").read_text().lstrip().startswith("[")
    assert (POPE_DIR / "coco-llava-1.5" / "coco_pope_random.json").read_text().lstrip().startswith("{")


@pytest.mark.parametrize("folder", ["coco-2023-11", "coco-llava-1.5"])
def test_coco_splits_share_images_and_positives(folder):
    splits = {s: _load(folder, s) for s in ("random", "popular", "adversarial")}
    images = {s: {q.image for q in qs} for s, qs in splits.items()}
    assert images["random"] == images["popular"] == images["adversarial"]
    positives = {s: {(q.image, q.text) for q in qs if q.label == "yes"} for s, qs in splits.items()}
    assert positives["random"] == positives["popular"] == positives["adversarial"]


@pytest.mark.parametrize("folder", ["aokvqa", "gqa"])
@pytest.mark.parametrize("split", ["random", "popular"])
def test_seem_files_order_yyynnn(folder, split):
    qs = _load(folder, split)
    for i in range(0, len(qs), 6):
        assert [q.label for q in qs[i : i + 6]] == ["yes"] * 3 + ["no"] * 3
