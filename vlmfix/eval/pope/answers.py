"""Existing POPE answer files: read them in the layouts the field writes, match them to questions.

Scoring answers someone already generated is the most common use of POPE. Three layouts
are read (JSON lines, a JSON array, or a JSON object holding the records under
``logs`` / ``samples``):

- **one answers file per question file**: LLaVA's ``model_vqa_loader`` output
  (``{"question_id", "prompt", "text", ...}``) or any record with ``question_id`` and
  the answer as ``text`` / ``answer``;
- **per-sample dumps** of lmms-eval (``{"doc": {"question_id", "question", "answer",
  "category"}, "target", "filtered_resps": [...], "resps": [[...]]}``) and VLMEvalKit
  (``{"index", "question", "answer", "prediction", "category"}``, exported to JSON):
  the model's answer is ``prediction`` / ``filtered_resps`` / ``resps``, and their
  ``answer`` / ``target`` is the gold label, checked against the question file;
- **one merged file for several splits**: LLaVA's evaluation asks all three COCO splits
  from one question file (``llava_pope_test.jsonl``) and writes one answers file whose
  question ids run on from split to split (each split's ids offset by the questions
  before it). Records that name their split (``category`` / ``split``) are routed by
  it; otherwise the offsets are inferred from the question files and checked against
  the prompts stored with the answers.

Every question must get exactly one answer; anything else is a :class:`DataError`
that names the file, the line and what does not match.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError, DataError
from vlmfix.eval.pope.data import PopeQuestion
from vlmfix.eval.records import read_records
from vlmfix.io import read_text

__all__ = ["AnswerRecord", "read_answer_records", "load_answers", "load_split_answers"]

logger = logging.getLogger(__name__)

# Keys holding the model's answer, most specific first. "answer" is the model's answer
# only when no prediction key is present (in VLMEvalKit / lmms-eval it is the label).
_PRED_KEYS = ("text", "prediction", "filtered_resps", "resps", "response", "output", "pred_answer")
_LABEL_KEYS = ("label", "target", "gt_answer", "ground_truth")
_SPLIT_KEYS = ("category", "split")
_PROMPT_KEYS = ("prompt", "question")
_ID_KEYS = ("question_id", "index")
_MAX_PERMUTED_SPLITS = 4  # 24 orders at most


@dataclass(frozen=True)
class AnswerRecord:
    """One answer as read from a file: where it was, its question id and text, and what
    the file says about its split, gold label and prompt (None when absent)."""

    lineno: int
    question_id: int | str
    text: str
    split: str | None = None
    label: str | None = None
    prompt: str | None = None


def _first_text(value: Any) -> str | None:
    """The first string of a possibly nested list (lmms-eval's ``resps``: ``[["Yes"]]``)."""
    while isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def _lookup(rec: Mapping[str, Any], keys: Sequence[str]) -> tuple[str | None, Any]:
    """Find the first of ``keys`` in the record, then in its ``doc`` (lmms-eval), then in any
    nested metric dict (lmms-eval's ``pope_accuracy``)."""
    scopes = [rec]
    if isinstance(rec.get("doc"), Mapping):
        scopes.append(rec["doc"])
    scopes += [v for k, v in rec.items() if k != "doc" and isinstance(v, Mapping)]
    for scope in scopes:  # the record's own fields win over the nested ones
        for key in keys:
            if key in scope and scope[key] is not None:
                return key, scope[key]
    return None, None


def _yes_no(value: Any) -> str | None:
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower()
    return None


def _parse(path: Path, lineno: int, rec: Any) -> AnswerRecord:
    where = f"{path}:{lineno}"
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected a JSON object with a question id and an answer, got {type(rec).__name__}")
    id_key, qid = _lookup(rec, _ID_KEYS)
    if id_key is None or isinstance(qid, bool) or not isinstance(qid, int | str):
        raise DataError(
            f"{where}: no question id; an answer record needs 'question_id' (LLaVA, lmms-eval 'doc') "
            "or 'index' (VLMEvalKit)"
        )
    pred_key, pred = _lookup(rec, _PRED_KEYS)
    label = None
    if pred_key is None:
        pred_key, pred = ("answer", rec["answer"]) if "answer" in rec else (None, None)
    else:
        _, gold = _lookup(rec, ("answer",))  # with a prediction key, "answer" is the gold label
        label = _yes_no(gold)
    text = _first_text(pred)
    if pred_key is None or text is None:
        raise DataError(
            f"{where}: needs the model's answer as a string 'text' or 'answer' (LLaVA), 'prediction' "
            "(VLMEvalKit) or 'filtered_resps' / 'resps' (lmms-eval)"
        )
    _, lab = _lookup(rec, _LABEL_KEYS)
    label = _yes_no(lab) or label
    _, split = _lookup(rec, _SPLIT_KEYS)
    _, prompt = _lookup(rec, _PROMPT_KEYS)
    return AnswerRecord(
        lineno,
        qid,
        text,
        split if isinstance(split, str) else None,
        label,
        prompt if isinstance(prompt, str) else None,
    )


def read_answer_records(path: str | os.PathLike) -> list[AnswerRecord]:
    """Read every answer record of a file (JSON lines, JSON array, or an object with ``logs``).

    Raises:
        DataError: missing file, malformed JSON, a record without question id or answer
            (naming ``file:line``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"answers file {path} does not exist")
    text = read_text(path)  # UTF-8, BOM dropped; other encodings are a DataError
    items: list[tuple[int, Any]] | None = None
    if text.lstrip().startswith("{"):
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None  # JSON lines
        if isinstance(whole, dict):
            logs = next((whole[k] for k in ("logs", "samples") if isinstance(whole.get(k), list)), None)
            items = [(i + 1, r) for i, r in enumerate(logs)] if logs is not None else [(1, whole)]
    if items is None:
        items = read_records(path, "answers file")
    records = [_parse(path, lineno, rec) for lineno, rec in items]
    if not records:
        raise DataError(f"{path}: no answers found")
    return records


def _norm_id(qid: int | str, ints: bool) -> int | str:
    """lmms-eval stores ids as strings; match them to integer ids of the question file."""
    if ints and isinstance(qid, str) and re.fullmatch(r"-?\d+", qid.strip()):
        return int(qid)
    return qid


def _norm_text(s: str) -> str:
    return " ".join(s.lower().split())


def _match(
    path: Path, records: Sequence[AnswerRecord], questions: Sequence[PopeQuestion], offset: int = 0, split: str = ""
) -> dict[int | str, str]:
    """One-to-one match of ``records`` (ids minus ``offset``) to ``questions``; checks
    repeated ids, unknown / unanswered ids, and the labels and prompts the file carries."""
    ints = all(isinstance(q.question_id, int) for q in questions)
    by_id = {q.question_id: q for q in questions}
    answers: dict[int | str, str] = {}
    seen: dict[int | str, int] = {}
    label_clash = prompt_clash = None
    for r in records:
        qid = _norm_id(r.question_id, ints)
        if offset:
            qid = qid - offset
        if qid in seen:
            raise DataError(
                f"{path}:{r.lineno}: question_id {r.question_id!r} is answered twice (first on line {seen[qid]})"
            )
        seen[qid] = r.lineno
        answers[qid] = r.text
        q = by_id.get(qid)
        if q is None:
            continue
        if label_clash is None and r.label is not None and r.label != q.label:
            label_clash = (r, q)
        if prompt_clash is None and r.prompt is not None and _norm_text(q.text) not in _norm_text(r.prompt):
            prompt_clash = (r, q)
    ids = set(by_id)
    name = f" (split {split})" if split else ""
    if set(answers) != ids:
        extra = sorted(map(str, set(answers) - ids))[:5]
        missing = sorted(map(str, ids - set(answers)))[:5]
        raise DataError(
            f"{path}{name}: {len(answers)} answers for {len(questions)} questions "
            f"(unknown ids: {extra or 'none'}; unanswered: {missing or 'none'}); "
            "answers must match the question file one to one: check that the answers were "
            "generated from this question file (POPE version, split)"
        )
    for clash, what in ((label_clash, "label"), (prompt_clash, "question")):
        if clash is not None:
            r, q = clash
            got = r.label if what == "label" else r.prompt
            want = q.label if what == "label" else q.text
            raise DataError(
                f"{path}:{r.lineno}{name}: the answer to question {r.question_id!r} carries {what} {got!r}, "
                f"but the question file has {want!r}; the answers were made for other questions "
                "(another split or POPE version); pass the question files they were generated from"
            )
    return answers


def load_answers(path: str | os.PathLike, questions: Sequence[PopeQuestion]) -> dict[int | str, str]:
    """Load a model's answers to one question file.

    Each record holds the question id and the answer in any layout of the module
    docstring (LLaVA answers, lmms-eval or VLMEvalKit per-sample dumps).

    Returns:
        ``{question_id: answer text}``.

    Raises:
        DataError: malformed records (naming file:line), repeated ids, answers to unknown
            questions, unanswered questions, or a gold label / question text in the
            answers that differs from the question file.

    Example:
        >>> load_answers("answers.jsonl", load_questions("coco_pope_random.json"))  # doctest: +SKIP
        {1: 'Yes', 2: 'No', ...}
    """
    path = Path(path)
    return _match(path, read_answer_records(path), questions)


def load_split_answers(
    paths: Sequence[str | os.PathLike], splits: Mapping[str, Sequence[PopeQuestion]]
) -> dict[str, dict[int | str, str]]:
    """Load answers for several splits: one file per split, or one merged file for all.

    Args:
        paths: answers files, one per split in the order of ``splits``, or a single
            file covering every split (LLaVA's merged layout, or a dump naming each
            record's split in ``category`` / ``split``).
        splits: split name -> its questions, in the order the question files were given.

    Returns:
        split name -> ``{question_id: answer text}`` (question ids of the split's file).

    Raises:
        ConfigError: the number of files fits neither layout.
        DataError: the answers do not match the questions one to one.
    """
    if len(paths) == len(splits):
        out = {}
        for (name, qs), p in zip(splits.items(), paths, strict=True):
            records = read_answer_records(p)
            if name in {r.split for r in records}:  # a dump of several splits: keep this one
                records = [r for r in records if r.split == name]
            out[name] = _match(Path(p), records, qs, split=name if len(splits) > 1 else "")
        return out
    if len(paths) != 1:
        raise ConfigError(
            f"{len(paths)} --answers files for {len(splits)} --questions files; give one answers file per "
            "question file, or one merged answers file for all of them"
        )
    path = Path(paths[0])
    records = read_answer_records(path)
    named = {r.split for r in records}
    if None not in named:
        if not named <= set(splits):
            raise DataError(
                f"{path}: its records name the splits {sorted(named)}, but the --questions files are "
                f"{list(splits)}; name each question file with --split (e.g. --split random)"
            )
        groups = {s: [r for r in records if r.split == s] for s in splits}
        return {s: _match(path, groups[s], splits[s], split=s) for s in splits}
    return _by_offsets(path, records, splits)


def _by_offsets(
    path: Path, records: Sequence[AnswerRecord], splits: Mapping[str, Sequence[PopeQuestion]]
) -> dict[str, dict[int | str, str]]:
    """Merged layout without split names: ids of split k are its file's ids + an offset."""
    if not all(isinstance(q.question_id, int) for qs in splits.values() for q in qs):
        raise DataError(f"{path}: a merged answers file needs integer question ids in every question file")
    first: dict[Any, int] = {}
    for r in records:
        qid = _norm_id(r.question_id, True)
        if not isinstance(qid, int):
            raise DataError(f"{path}:{r.lineno}: a merged answers file needs integer question ids, got {qid!r}")
        if qid in first:
            raise DataError(f"{path}:{r.lineno}: question_id {qid} is answered twice (first on line {first[qid]})")
        first[qid] = r.lineno
    ids = set(first)
    total = sum(len(qs) for qs in splits.values())
    if len(records) != total:
        raise DataError(
            f"{path}: {len(records)} answers for {total} questions in {len(splits)} files "
            f"({', '.join(f'{k}: {len(v)}' for k, v in splits.items())}); a merged answers file must answer "
            "every question of every file once"
        )
    names = list(splits)
    orders = itertools.permutations(names) if len(names) <= _MAX_PERMUTED_SPLITS else [tuple(names)]
    candidates = []
    for order in orders:
        offsets = _offsets_for(order, splits, ids)
        if offsets is not None:
            candidates.append((order, offsets))
    if not candidates:
        raise DataError(
            f"{path}: its question ids are not the question files' ids offset split by split "
            f"(ids {min(ids)}..{max(ids)}); pass the question files the answers were generated from, "
            "or one answers file per question file"
        )
    by_id = {_norm_id(r.question_id, True): r for r in records}
    scored = []
    for order, offsets in candidates:
        checked = clashes = 0
        for name in order:
            for q in splits[name]:
                r = by_id[q.question_id + offsets[name]]
                if r.prompt is not None:
                    checked += 1
                    clashes += _norm_text(q.text) not in _norm_text(r.prompt)
                if r.label is not None:
                    checked += 1
                    clashes += r.label != q.label
        scored.append((clashes, checked, order, offsets))
    consistent = [c for c in scored if c[0] == 0]
    given = tuple(names)
    if not consistent:
        clashes, checked, order, _ = min(scored, key=lambda c: c[0])
        raise DataError(
            f"{path}: the answers' prompts/labels do not match the questions in any split order "
            f"(best order {list(order)}: {clashes} of {checked} differ); the answers were made for other "
            "questions (another POPE version?)"
        )
    if len(consistent) > 1 and consistent[0][1] == 0:
        # nothing to check against: take the order the question files were given in
        chosen = next((c for c in consistent if c[2] == given), consistent[0])
        logger.warning(
            "%s: merged answers carry no prompts or labels; assuming the split order %s of the --questions files",
            path,
            list(chosen[2]),
        )
    else:
        chosen = next((c for c in consistent if c[2] == given), consistent[0])
    _, _, order, offsets = chosen
    logger.info("%s: merged answers, split offsets %s", path, {k: offsets[k] for k in order})
    return {name: {q.question_id: by_id[q.question_id + offsets[name]].text for q in splits[name]} for name in names}


def _offsets_for(
    order: Sequence[str], splits: Mapping[str, Sequence[PopeQuestion]], ids: set[int]
) -> dict[str, int] | None:
    """Offsets placing each split's ids, in ``order``, on the lowest answer ids still free."""
    free = set(ids)
    offsets = {}
    for name in order:
        qids = [q.question_id for q in splits[name]]
        if not free:
            return None
        offset = min(free) - min(qids)
        shifted = {q + offset for q in qids}
        if not shifted <= free:
            return None
        free -= shifted
        offsets[name] = offset
    return offsets if not free else None
