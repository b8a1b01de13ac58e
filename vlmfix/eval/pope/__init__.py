"""POPE: polling-based object probing (Li et al., EMNLP 2023).

Public API::

    from vlmfix.eval.pope import load_questions, get_parser, pope_metrics
    qs = load_questions("coco_pope_random.json")
    parser = get_parser("pope_official")
    pope_metrics([parser(a) for a in answers], [q.label for q in qs])
"""

from vlmfix.eval.pope.answers import load_answers, load_split_answers, read_answer_records
from vlmfix.eval.pope.build import CocoObjects, build_questions, load_coco_objects
from vlmfix.eval.pope.data import SPLITS, PopeQuestion, load_questions, split_name, write_questions
from vlmfix.eval.pope.metrics import POPE_METRIC_VERSION, mean_f1, pope_metrics
from vlmfix.eval.pope.parsers import (
    PARSERS,
    TEMPLATES,
    AnswerParser,
    apply_template,
    get_parser,
    get_template,
    parse_official,
    parse_yes_no_unknown,
)
from vlmfix.eval.pope.task import run_pope, score_pope_records

__all__ = [
    "PARSERS",
    "POPE_METRIC_VERSION",
    "SPLITS",
    "TEMPLATES",
    "AnswerParser",
    "CocoObjects",
    "PopeQuestion",
    "apply_template",
    "build_questions",
    "get_parser",
    "get_template",
    "load_answers",
    "load_split_answers",
    "read_answer_records",
    "load_coco_objects",
    "load_questions",
    "mean_f1",
    "parse_official",
    "parse_yes_no_unknown",
    "pope_metrics",
    "run_pope",
    "score_pope_records",
    "split_name",
    "write_questions",
]
