"""Existing POPE answer files: LLaVA's merged layout, lmms-eval / VLMEvalKit dumps, mismatches."""

from __future__ import annotations

import json
import logging

import pytest

from vlmfix.errors import ConfigError, DataError
from vlmfix.eval.pope import PopeQuestion, load_answers, load_split_answers

SUFFIX = "\nAnswer the question using a single word or phrase."
OBJECTS = ["dog", "cat", "car", "bus", "cup", "tie", "bed", "sink"]


def _split(name: str, n: int, shift: int) -> list[PopeQuestion]:
    # the same image and positive question in every split; negatives differ per split
    return [
        PopeQuestion(
            i + 1,
            f"img{i // 2}.jpg",
            f"Is there a {OBJECTS[(i + (0 if i % 2 == 0 else shift)) % len(OBJECTS)]} in the image?",
            "yes" if i % 2 == 0 else "no",
        )
        for i in range(n)
    ]


@pytest.fixture()
def splits():
    return {"random": _split("random", 6, 1), "popular": _split("popular", 8, 2), "adversarial": _split("adv", 8, 3)}


def _answer(q: PopeQuestion, split: str) -> str:
    return f"{split}:{q.question_id}"  # tells us where each answer went


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _merged(splits, order, prompts=True, start=1):
    recs, qid = [], start
    for name in order:
        for q in splits[name]:
            rec = {"question_id": qid, "text": _answer(q, name), "answer_id": "x", "model_id": "m", "metadata": {}}
            if prompts:
                rec["prompt"] = q.text + SUFFIX
            recs.append(rec)
            qid += 1
    return recs


def _expected(splits):
    return {name: {q.question_id: _answer(q, name) for q in qs} for name, qs in splits.items()}


@pytest.mark.parametrize("order", [("adversarial", "popular", "random"), ("random", "popular", "adversarial")])
def test_llava_merged_layout_offsets_are_inferred_and_checked_by_prompts(tmp_path, splits, order):
    path = _write(tmp_path / "merged.jsonl", _merged(splits, order))
    assert load_split_answers([path], splits) == _expected(splits)


def test_merged_layout_with_same_sized_splits_is_told_apart_by_prompts(tmp_path):
    sp = {"random": _split("r", 8, 1), "popular": _split("p", 8, 2), "adversarial": _split("a", 8, 3)}
    path = _write(tmp_path / "merged.jsonl", _merged(sp, ("popular", "adversarial", "random"), start=101))
    assert load_split_answers([path], sp) == _expected(sp)


def test_merged_layout_without_prompts_takes_the_given_order(tmp_path, caplog):
    sp = {"random": _split("r", 8, 1), "popular": _split("p", 8, 2)}
    path = _write(tmp_path / "merged.jsonl", _merged(sp, ("random", "popular"), prompts=False))
    with caplog.at_level(logging.WARNING):
        assert load_split_answers([path], sp) == _expected(sp)
    assert "assuming the split order" in caplog.text


def test_merged_layout_mismatches_are_clear_errors(tmp_path, splits):
    recs = _merged(splits, ("random", "popular", "adversarial"))
    path = _write(tmp_path / "short.jsonl", recs[:-1])
    with pytest.raises(DataError, match=r"21 answers for 22 questions in 3 files"):
        load_split_answers([path], splits)
    path = _write(tmp_path / "dup.jsonl", [*recs[:-1], dict(recs[0])])
    with pytest.raises(DataError, match=r"dup\.jsonl:22: question_id 1 is answered twice \(first on line 1\)"):
        load_split_answers([path], splits)
    other = [dict(r, prompt="Is there a giraffe in the image?") for r in recs]
    path = _write(tmp_path / "other.jsonl", other)
    with pytest.raises(DataError, match="do not match the questions in any split order"):
        load_split_answers([path], splits)
    with pytest.raises(ConfigError, match="2 --answers files for 3 --questions files"):
        load_split_answers([path, path], splits)


def _lmms_record(q, split, resp, doc_id):
    return {
        "doc_id": doc_id,
        "doc": {"question_id": str(q.question_id), "question": q.text, "answer": q.label, "category": split},
        "target": q.label,
        "arguments": [[q.text]],
        "resps": [[resp]],
        "filtered_resps": [resp],
        "pope_accuracy": {"question_id": str(q.question_id), "score": 1.0, "prediction": "yes", "ground_truth": "yes"},
    }


def test_lmms_eval_dump_routes_by_category_and_reads_string_ids(tmp_path, splits):
    recs = [_lmms_record(q, s, _answer(q, s), i) for s, qs in splits.items() for i, q in enumerate(qs)]
    path = _write(tmp_path / "samples_pope.jsonl", recs)
    assert load_split_answers([path], splits) == _expected(splits)
    # the older single JSON object with "logs"
    obj = tmp_path / "pope.json"
    obj.write_text(json.dumps({"logs": recs}, indent=2))
    assert load_split_answers([obj], splits) == _expected(splits)


def test_vlmevalkit_dump_uses_prediction_not_the_gold_answer(tmp_path, splits):
    qs = splits["random"]
    recs = [
        {"index": q.question_id, "question": q.text, "answer": q.label.capitalize(), "prediction": "No"} for q in qs
    ]
    path = tmp_path / "vlmevalkit.json"
    path.write_text(json.dumps(recs, indent=1))
    assert set(load_answers(path, qs).values()) == {"No"}


def test_gold_labels_or_questions_that_differ_are_errors(tmp_path, splits):
    qs = splits["random"]
    flipped = [_lmms_record(q, "random", "Yes", i) for i, q in enumerate(qs)]
    flipped[3]["target"] = "yes" if qs[3].label == "no" else "no"
    flipped[3]["doc"]["answer"] = flipped[3]["target"]
    path = _write(tmp_path / "a.jsonl", flipped)
    with pytest.raises(DataError, match=r"a\.jsonl:4: the answer to question '4' carries label"):
        load_answers(path, qs)
    wrong = [{"question_id": q.question_id, "prompt": "Is there a giraffe in the image?", "text": "No"} for q in qs]
    path = _write(tmp_path / "b.jsonl", wrong)
    with pytest.raises(DataError, match=r"b\.jsonl:1: the answer to question 1 carries question"):
        load_answers(path, qs)


def test_records_without_id_or_answer_name_the_line(tmp_path, splits):
    path = _write(tmp_path / "c.jsonl", [{"question_id": 1, "text": "Yes"}, {"text": "No"}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: no question id"):
        load_answers(path, splits["random"])


def test_a_dump_of_several_splits_scores_one_question_file_or_names_the_splits(tmp_path, splits):
    recs = [_lmms_record(q, s, _answer(q, s), i) for s, qs in splits.items() for i, q in enumerate(qs)]
    path = _write(tmp_path / "samples_pope.jsonl", recs)
    assert load_split_answers([path], {"popular": splits["popular"]}) == {"popular": _expected(splits)["popular"]}
    renamed = {f"coco_pope_{k}": v for k, v in splits.items()}
    with pytest.raises(DataError, match=r"name the splits .*adversarial.*--split"):
        load_split_answers([path], renamed)
