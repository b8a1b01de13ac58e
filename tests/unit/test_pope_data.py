"""POPE question files: formats, validation, errors naming file:line."""

from __future__ import annotations

import json

import pytest

from vlmfix.errors import DataError
from vlmfix.eval.pope import load_answers, load_questions, split_name, write_questions

Q = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}


def _lines(tmp_path, *lines, name="q.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_json_lines_and_array_give_the_same_questions(tmp_path):
    recs = [dict(Q, question_id=i, label=lab) for i, lab in enumerate(["yes", "no", "yes"], start=1)]
    jl = _lines(tmp_path, *(json.dumps(r) for r in recs))
    arr = tmp_path / "q.json"
    arr.write_text(json.dumps(recs, indent=4), encoding="utf-8")
    assert load_questions(jl) == load_questions(arr)
    assert [q.label for q in load_questions(arr)] == ["yes", "no", "yes"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = _lines(tmp_path, json.dumps(Q), '{"question_id": 2, "image": "a.jpg",', json.dumps(dict(Q, question_id=3)))
    with pytest.raises(DataError, match=r"q\.jsonl:2: malformed JSON"):
        load_questions(path)


def test_malformed_array_element_names_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"question_id": 1, "image": "a.jpg", "text": "t", "label": "yes"},\n  {"oops": }\n]\n')
    with pytest.raises(DataError, match=r"arr\.json:3"):
        load_questions(path)


def test_array_element_missing_key_names_line(tmp_path):
    path = tmp_path / "arr.json"
    good = json.dumps(Q, indent=4)
    bad = json.dumps({"question_id": 2, "image": "a.jpg", "label": "no"}, indent=4)
    path.write_text(f"[\n{good},\n{bad}\n]")
    line_of_bad = 2 + good.count("\n") + 1
    with pytest.raises(DataError, match=rf"arr\.json:{line_of_bad}: missing key\(s\) \['text'\]"):
        load_questions(path)


@pytest.mark.parametrize(
    "rec,msg",
    [
        ({k: v for k, v in Q.items() if k != "label"}, r"missing key\(s\) \['label'\]"),
        (dict(Q, label="maybe"), "label must be 'yes' or 'no'"),
        (dict(Q, image=""), "'image' must be a non-empty string"),
        (dict(Q, question_id=[1]), "question_id must be"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_invalid_records(tmp_path, rec, msg):
    path = _lines(tmp_path, json.dumps(dict(Q, question_id=99)), json.dumps(rec))
    with pytest.raises(DataError, match=rf"q\.jsonl:2: {msg}"):
        load_questions(path)


def test_duplicate_ids_and_empty_and_missing(tmp_path):
    with pytest.raises(DataError, match="repeats line 1"):
        load_questions(_lines(tmp_path, json.dumps(Q), json.dumps(Q)))
    with pytest.raises(DataError, match="no questions"):
        load_questions(_lines(tmp_path, "", name="empty.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")


def test_label_is_normalized(tmp_path):
    qs = load_questions(_lines(tmp_path, json.dumps(dict(Q, label=" Yes "))))
    assert qs[0].label == "yes"


def test_write_then_load_roundtrip(tmp_path):
    qs = load_questions(_lines(tmp_path, json.dumps(Q), json.dumps(dict(Q, question_id=2, label="no"))))
    out = write_questions(qs, tmp_path / "out.jsonl")
    assert load_questions(out) == qs


def test_split_name():
    assert split_name("x/coco_pope_adversarial.json") == "adversarial"
    assert split_name("gqa_pope_seem_popular.json") == "popular"
    assert split_name("custom.jsonl") == "custom"


def test_load_answers_matches_questions(tmp_path):
    qs = load_questions(_lines(tmp_path, json.dumps(Q), json.dumps(dict(Q, question_id=2, label="no"))))
    ans = _lines(
        tmp_path,
        json.dumps({"question_id": 2, "text": "No"}),
        json.dumps({"question_id": 1, "answer": "Yes"}),
        name="a.jsonl",
    )
    assert load_answers(ans, qs) == {1: "Yes", 2: "No"}


@pytest.mark.parametrize(
    "lines,msg",
    [
        ([{"question_id": 1, "text": "Yes"}], r"1 answers for 2 questions .*unanswered: \['2'\]"),
        ([{"question_id": 1, "text": "Yes"}, {"question_id": 3, "text": "No"}], r"unknown ids: \['3'\]"),
        (
            [{"question_id": 1, "text": "Yes"}, {"question_id": 1, "text": "No"}],
            "a.jsonl:2: question_id 1 is answered twice",
        ),
        ([{"question_id": 1}], "a.jsonl:1: needs the model's answer"),
    ],
)
def test_load_answers_errors(tmp_path, lines, msg):
    qs = load_questions(_lines(tmp_path, json.dumps(Q), json.dumps(dict(Q, question_id=2, label="no"))))
    ans = _lines(tmp_path, *(json.dumps(x) for x in lines), name="a.jsonl")
    with pytest.raises(DataError, match=msg):
        load_answers(ans, qs)
