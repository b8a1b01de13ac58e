"""Scoring an existing answers file on the official POPE files: LLaVA's merged layout
(one answers file for the three COCO splits, question ids running on split by split)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from vlmfix.eval.cli import register
from vlmfix.eval.pope import load_questions, load_split_answers, pope_metrics
from vlmfix.eval.report import load_results


def reference_dir() -> Path:
    env = os.environ.get("VLMFIX_REFERENCE")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "reference"


POPE_DIR = reference_dir() / "pope" / "coco-llava-1.5"
pytestmark = pytest.mark.skipif(not POPE_DIR.is_dir(), reason="shared/reference/pope not available")
SPLITS = ("random", "popular", "adversarial")
SUFFIX = "\nAnswer the question using a single word or phrase."


def _model(q, k):
    right = q.label.capitalize()
    return right if k % 7 else ("No" if right == "Yes" else "Yes")


def _merged(tmp_path, order):
    recs, qid = [], 0
    for split in order:
        for k, q in enumerate(load_questions(POPE_DIR / f"coco_pope_{split}.json")):
            qid += 1
            recs.append({"question_id": qid, "prompt": q.text + SUFFIX, "text": _model(q, k), "model_id": "m"})
    path = tmp_path / "merged_answers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


@pytest.mark.parametrize("order", [("adversarial", "popular", "random"), ("random", "popular", "adversarial")])
def test_merged_answers_on_the_llava_files(tmp_path, order):
    splits = {s: load_questions(POPE_DIR / f"coco_pope_{s}.json") for s in SPLITS}
    got = load_split_answers([_merged(tmp_path, order)], splits)
    for s, qs in splits.items():
        assert got[s] == {q.question_id: _model(q, k) for k, q in enumerate(qs)}


def test_cli_scores_a_merged_answers_file_without_a_model(tmp_path):
    argv = ["pope", *(x for s in SPLITS for x in ("--questions", str(POPE_DIR / f"coco_pope_{s}.json")))]
    argv += ["--answers", str(_merged(tmp_path, ("adversarial", "popular", "random")))]
    # --limit keeps the run short (every record is fsynced); the answers are still matched in full
    argv += ["--out", str(tmp_path / "run"), "--no-progress", "--bootstrap", "200", "--limit", "600"]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    res = load_results(tmp_path / "run")
    for s in SPLITS:
        qs = load_questions(POPE_DIR / f"coco_pope_{s}.json")[:600]
        preds = [_model(q, k).lower() for k, q in enumerate(qs)]
        want = pope_metrics(preds, [q.label for q in qs])
        assert res["splits"][s]["f1"] == pytest.approx(want["f1"])
        assert res["splits"][s]["count"] == len(qs)
        lo, hi = res["splits"][s]["ci"]["f1"]
        assert lo < want["f1"] < hi
    images = {q.image for s in SPLITS for q in load_questions(POPE_DIR / f"coco_pope_{s}.json")[:600]}
    assert res["bootstrap"]["n_resamples"] == 200 and res["bootstrap"]["n_units"] == len(images)
