"""Crash-safe JSON-lines output shared by the caption CLI and the evaluators.

Records are appended one line per ``os.write`` on an ``O_APPEND`` descriptor and synced,
so an interrupted run leaves at most one partial last line. :func:`repair_jsonl` cuts
such a line off before a resumed run appends, and :func:`read_jsonl` reads every
complete record, so a resumed run neither duplicates nor drops records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vlmfix.errors import DataError

__all__ = ["JsonlWriter", "read_json", "read_jsonl", "repair_jsonl", "done_keys"]


def repair_jsonl(path: str | os.PathLike) -> int:
    """Truncate a trailing partial or unparsable line left by an interrupted writer.

    Returns:
        The number of bytes removed (0 when the file is absent or already clean).
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data:
        return 0
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
    else:
        # A complete but corrupt last line (e.g. a torn write that happened to end in
        # a newline byte) is also cut; earlier corrupt lines are reported by read_jsonl.
        start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[start:])
        except ValueError:
            keep = start
    removed = len(data) - keep
    if removed:
        with open(path, "r+b") as fh:
            fh.truncate(keep)
    return removed


def read_json(path: str | os.PathLike, *, missing: str | None = None) -> Any:
    """Read one JSON document.

    Raises:
        DataError: the file does not exist (``missing`` is the message, if given) or is
            not valid JSON (naming the file and the parser's complaint).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(missing or f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def read_jsonl(path: str | os.PathLike, *, strict: bool = True) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSON-lines file.

    Args:
        path: the file.
        strict: raise :class:`DataError` (naming file and line) on a malformed line;
            when False, skip malformed lines, and also an unterminated last line.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            if strict:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc}); fix or remove that line") from None
            continue
        if not isinstance(rec, dict):
            if strict:
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            continue
        yield rec


def done_keys(path: str | os.PathLike, key: str) -> set:
    """Return the set of ``record[key]`` over complete records of ``path`` (empty if absent)."""
    path = Path(path)
    if not path.exists():
        return set()
    return {rec[key] for rec in read_jsonl(path, strict=False) if key in rec}


class JsonlWriter:
    """Append JSON records to a file, one atomic line each.

    Use as a context manager. Opening repairs a torn last line first, so appending after
    a crash is always safe.

    Example:
        >>> with JsonlWriter("out.jsonl") as w:  # doctest: +SKIP
        ...     w.write({"path": "a.jpg", "text": "a cat"})
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None

    def open(self) -> JsonlWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise RuntimeError("JsonlWriter.write called before open() / outside its `with` block")
        line = (json.dumps(record, ensure_ascii=False, default=_json_default) + "\n").encode()
        view = memoryview(line)
        while view:  # os.write may be partial for very large records
            n = os.write(self._fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(self._fd)

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        for rec in records:
            self.write(rec)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlWriter:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
