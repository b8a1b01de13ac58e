"""POPE builder on a small synthetic COCO instances file."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from vlmfix.errors import ConfigError, DataError
from vlmfix.eval.pope import build_questions, load_coco_objects

CATS = ["person", "dog", "cat", "car", "chair", "cup", "bottle", "bus", "pizza", "tv", "apple", "kite"]


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    """40 images; 1-6 categories each, listed in a known annotation order, with a strong
    co-occurrence (dog with cat) and a clear frequency ranking."""
    rng = random.Random(7)
    images, anns, truth = [], [], {}
    aid = 1
    for i in range(1, 41):
        images.append({"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 4, "height": 4})
        k = rng.randint(1, 6)
        cats = rng.sample(range(len(CATS)), k)
        if 1 in cats and 2 not in cats and len(cats) > 1:
            cats[-1] = 2  # dog and cat go together
        truth[i] = []
        for c in cats:
            for _ in range(rng.randint(1, 2)):  # repeated instances of one category
                anns.append(
                    {"id": aid, "image_id": i, "category_id": c + 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
                )
                aid += 1
            if CATS[c] not in truth[i]:
                truth[i].append(CATS[c])
    rng.shuffle(anns)  # file order must not matter: first objects follow annotation ids
    path = tmp_path_factory.mktemp("coco") / "instances_val2014.json"
    data = {"images": images, "annotations": anns, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATS)]}
    path.write_text(json.dumps(data))
    return path, truth


def _by_image(qs):
    out = {}
    for q in qs:
        out.setdefault(q.image, []).append(q)
    return out


def _name(q):
    return re.fullmatch(r"Is there an? (.+) in the image\?", q.text).group(1)


def _stats(truth):
    freq = Counter(c for cats in truth.values() for c in set(cats))
    co = Counter()
    for cats in truth.values():
        for a in cats:
            for b in cats:
                if a != b:
                    co[(a, b)] += 1
    return freq, co


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_structure(coco_file, split):
    path, truth = coco_file
    qs = build_questions(path, split, n_images=10, seed=3)
    assert len(qs) == 60
    assert [q.question_id for q in qs] == list(range(1, 61))
    per_image = _by_image(qs)
    assert len(per_image) == 10 and all(len(v) == 6 for v in per_image.values())
    for image, group in per_image.items():
        gt = truth[int(image[-16:-4])]
        assert [q.label for q in group] == ["yes", "no"] * 3
        assert [_name(q) for q in group[0::2]] == gt[:3]  # first three objects, in order
        negatives = [_name(q) for q in group[1::2]]
        assert len(set(negatives)) == 3 and not set(negatives) & set(gt)


def test_popular_is_most_frequent_absent_unused(coco_file):
    path, truth = coco_file
    freq, _ = _stats(truth)
    ranking = sorted(CATS, key=lambda c: (-freq[c], c))
    for image, group in _by_image(build_questions(path, "popular", n_images=12, seed=1)).items():
        gt, used = truth[int(image[-16:-4])], []
        for q in group[1::2]:
            expected = next(c for c in ranking if c not in gt and c not in used)
            assert _name(q) == expected
            used.append(expected)


def test_adversarial_is_most_cooccurring_absent_unused(coco_file):
    path, truth = coco_file
    freq, co = _stats(truth)
    for image, group in _by_image(build_questions(path, "adversarial", n_images=12, seed=1)).items():
        gt, used = truth[int(image[-16:-4])], []
        for pos, neg in zip(group[0::2], group[1::2], strict=True):
            allowed = [c for c in CATS if c not in gt and c not in used]
            best = max(co[(_name(pos), c)] for c in allowed)
            assert co[(_name(pos), _name(neg))] == best
            used.append(_name(neg))


def test_seeded_reproducible_and_shared_images(coco_file):
    path, _ = coco_file
    a = build_questions(path, "random", n_images=10, seed=5)
    assert a == build_questions(path, "random", n_images=10, seed=5)
    assert a != build_questions(path, "random", n_images=10, seed=6)
    pop = build_questions(path, "popular", n_images=10, seed=5)
    # same images and the same positive questions in every split
    assert [q for q in a if q.label == "yes"] == [q for q in pop if q.label == "yes"]


def test_articles(coco_file):
    path, _ = coco_file
    texts = {q.text for q in build_questions(path, "popular", n_images=20, seed=0)}
    assert all(not t.startswith("Is there a a") for t in texts)
    for t in texts:
        name = t.removeprefix("Is there ").split(" ", 1)[1].removesuffix(" in the image?")
        assert t.startswith("Is there an ") == (name[0] in "aeiou")


def test_too_few_images_warns_and_uses_all(coco_file, caplog):
    path, truth = coco_file
    eligible = sum(len(c) >= 3 for c in truth.values())
    qs = build_questions(path, "random", n_images=500, seed=0)
    assert len(qs) == eligible * 6
    assert "using all of them" in caplog.text


def test_bad_inputs(coco_file, tmp_path):
    path, _ = coco_file
    with pytest.raises(ConfigError, match="unknown POPE split"):
        build_questions(path, "randm")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(DataError, match="not a COCO instances file"):
        load_coco_objects(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_coco_objects(tmp_path / "missing.json")
