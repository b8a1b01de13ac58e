"""CHAIR metrics and ground truth on hand-made data."""

from __future__ import annotations

import json

import pytest

from vlmfix.errors import ConfigError, DataError
from vlmfix.eval.chair import chair_metrics, ground_truth_from_coco, load_ground_truth, score_caption


def test_score_caption_and_metrics_by_hand():
    s1 = score_caption("A man and a dog on a sofa with a dog.", {"person", "dog", "tv"})
    s2 = score_caption("A cat on a table.", {"cat", "dining table"})
    s3 = score_caption("Nothing to see here.", {"car"})
    assert [m.category for m in s1.hallucinated] == ["couch"]
    assert s1.found == ["dog", "person"]
    m = chair_metrics([s1, s2, s3])
    assert m["n_captions"] == 3
    assert m["n_mentions"] == 4 + 2 + 0  # man, dog, sofa, dog; cat, table
    assert m["CHAIR_s"] == pytest.approx(1 / 3)
    assert m["CHAIR_i"] == pytest.approx(1 / 6)
    assert m["Recall"] == pytest.approx((2 + 2 + 0) / (3 + 2 + 1))
    assert m["Len"] == pytest.approx((12 + 6 + 5) / 3)


def test_hallucinated_spans_point_at_the_words():
    caption = "Two forks and a knife."
    s = score_caption(caption, {"knife"})
    assert [(caption[h.start : h.end], h.category) for h in s.hallucinated] == [("forks", "fork")]


def test_zero_mentions_and_no_captions_do_not_divide_by_zero():
    m = chair_metrics([score_caption("An empty room.", set())])
    assert m["CHAIR_i"] == 0.0 and m["Recall"] == 0.0 and m["n_mentions"] == 0
    m = chair_metrics([])
    assert m == {**m, "CHAIR_s": 0.0, "CHAIR_i": 0.0, "Len": 0.0, "n_captions": 0}


def test_metrics_accept_record_dicts():
    s = score_caption("A dog.", {"cat"})
    assert chair_metrics([s.to_dict()]) == chair_metrics([s])


@pytest.fixture()
def coco_dir(tmp_path):
    cats = [{"id": 1, "name": "dog"}, {"id": 18, "name": "cat"}, {"id": 3, "name": "car"}]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (10, 11, 12)]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 18, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0},
    ]
    caps = [
        {"id": 1, "image_id": 10, "caption": "A puppy sleeps near two people on a couch."},
        {"id": 2, "image_id": 12, "caption": "A toilet seat."},
    ]
    (tmp_path / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return tmp_path


def test_ground_truth_from_coco_instances_and_captions(coco_dir):
    gt = load_ground_truth(coco_dir)
    assert gt.objects[10] == {"dog", "person", "couch"}  # instances ∪ caption objects
    assert gt.objects[11] == {"cat", "car"}
    assert gt.objects[12] == {"toilet"}  # no instances; the caption's toilet seat is a toilet
    assert gt.resolve(path="x/COCO_val2014_000000000011.jpg") == 11
    # the instances file alone picks up its sibling captions file
    assert load_ground_truth(coco_dir / "instances_val2014.json").objects == gt.objects
    assert ground_truth_from_coco([coco_dir / "instances_val2014.json"]).objects[10] == {"dog"}


def test_ground_truth_json_mapping(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"5": ["dog", "dining table"], "6": []}))
    gt = load_ground_truth(path)
    assert gt.objects == {5: {"dog", "dining table"}, 6: frozenset()}
    assert gt.resolve(image_id="5") == 5
    with pytest.raises(DataError, match="image id 7 is not in the ground truth"):
        gt.resolve(image_id=7)
    with pytest.raises(DataError, match="cannot read an image id"):
        gt.resolve(path="photo.jpg")


@pytest.mark.parametrize(
    "content,msg",
    [
        ('{"5": ["dog", "table"]}', r"unknown COCO categories \['table'\]"),
        ('{"x": ["dog"]}', "not an integer image id"),
        ('{"5": "dog"}', "expected a list"),
        ("[1, 2]", "expected a JSON object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_ground_truth_errors(tmp_path, content, msg):
    path = tmp_path / "gt.json"
    path.write_text(content)
    with pytest.raises(DataError, match=msg):
        load_ground_truth(path)


def test_ground_truth_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_ground_truth(tmp_path / "nope.json")
    with pytest.raises(DataError, match="no instances_"):
        load_ground_truth(tmp_path)
    with pytest.raises(ConfigError, match="normalizer"):
        ground_truth_from_coco([], normalizer="x")


def test_ground_truth_builder_does_not_miss_buses_and_ties(tmp_path):
    # The common coco2014_gt_objects.json was built with pattern's singularize, which
    # reads "bus" as "bu" and "ties" as "ty" and so misses these objects in human
    # captions. vlmfix's builder reads them with its own normalizer.
    cats = [{"id": 1, "name": "person"}]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (20, 21, 22, 23)]
    caps = [
        {"id": 1, "image_id": 20, "caption": "A bus parked at the curb."},
        {"id": 2, "image_id": 21, "caption": "Two buses on a city street."},
        {"id": 3, "image_id": 22, "caption": "Neckties on display in a shop."},
        {"id": 4, "image_id": 23, "caption": "Several ties hanging on a rack."},
    ]
    (tmp_path / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": [], "categories": cats})
    )
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": caps}))
    for normalizer in ("lemma", "plural"):
        gt = load_ground_truth(tmp_path, normalizer)
        assert gt.objects[20] == {"bus"} and gt.objects[21] == {"bus"}
        assert gt.objects[22] == {"tie"} and gt.objects[23] == {"tie"}
