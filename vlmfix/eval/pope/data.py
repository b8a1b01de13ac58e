"""POPE question files: loading, validation and writing.

Every official format is accepted: JSON lines (the COCO files of RUCAIBox/POPE, including
the 2910-question random split LLaVA-1.5 evaluated on) and one pretty-printed JSON array
(the A-OKVQA and GQA files). Each question is ``{question_id, image, text, label}``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmfix.errors import DataError
from vlmfix.eval.records import parse_array as _parse_array
from vlmfix.eval.records import parse_lines as _parse_lines
from vlmfix.io import JsonlWriter, read_text

__all__ = ["PopeQuestion", "load_questions", "write_questions", "split_name", "SPLITS"]

#: The three POPE negative-sampling settings.
SPLITS = ("random", "popular", "adversarial")

_KEYS = ("question_id", "image", "text", "label")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question; ``label`` is "yes" or "no"."""

    question_id: int | str
    image: str
    text: str
    label: str

    def to_dict(self) -> dict:
        return asdict(self)


def load_questions(path: str | os.PathLike) -> list[PopeQuestion]:
    """Load and validate a POPE question file (JSON lines or a JSON array).

    Args:
        path: the question file.

    Returns:
        The questions in file order.

    Raises:
        DataError: unreadable file, malformed JSON, missing or mistyped keys, a label
            other than yes/no, or a repeated question_id; the message names file:line.

    Example:
        >>> qs = load_questions("coco_pope_random.json")  # doctest: +SKIP
        >>> qs[0].label
        'yes'
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"POPE question file {path} does not exist")
    text = read_text(path)  # UTF-8, BOM dropped; other encodings are a DataError
    body = text.lstrip()
    items = _parse_array(path, text) if body.startswith("[") else _parse_lines(path, text)
    if not items:
        raise DataError(f"{path}: no questions found; is this a POPE question file?")
    questions: list[PopeQuestion] = []
    seen: dict[int | str, int] = {}
    for lineno, rec in items:
        q = _validate(path, lineno, rec)
        if q.question_id in seen:
            raise DataError(
                f"{path}:{lineno}: question_id {q.question_id!r} repeats line {seen[q.question_id]}; "
                "question ids must be unique"
            )
        seen[q.question_id] = lineno
        questions.append(q)
    return questions


def _validate(path: Path, lineno: int, rec: object) -> PopeQuestion:
    where = f"{path}:{lineno}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in _KEYS if k not in rec]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}; a POPE question needs {list(_KEYS)}")
    qid = rec["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, int | str):
        raise DataError(f"{where}: question_id must be an int or string, got {qid!r}")
    for key in ("image", "text"):
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise DataError(f"{where}: {key!r} must be a non-empty string, got {rec[key]!r}")
    label = rec["label"]
    if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
        raise DataError(f"{where}: label must be 'yes' or 'no', got {label!r}")
    return PopeQuestion(qid, rec["image"], rec["text"], label.strip().lower())


def write_questions(questions: list[PopeQuestion], path: str | os.PathLike) -> Path:
    """Write questions as JSON lines (the official COCO format); replaces ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    with JsonlWriter(tmp, fsync=False) as w:
        w.write_many(q.to_dict() for q in questions)
    os.replace(tmp, path)
    return path


def split_name(path: str | os.PathLike) -> str:
    """Infer the split name from a question file name (e.g. ``coco_pope_popular.json``).

    Returns the matching name of :data:`SPLITS`, else the file stem.
    """
    stem = Path(path).stem.lower()
    hits = [s for s in SPLITS if s in stem]
    return hits[0] if len(hits) == 1 else Path(path).stem
