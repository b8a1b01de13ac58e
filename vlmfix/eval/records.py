"""Line-numbered reading of JSON-lines files and JSON arrays (question, answer, caption files).

Errors name ``file:line`` of the offending record, for JSON lines and for elements of a
pretty-printed JSON array alike.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from vlmfix.errors import DataError
from vlmfix.io import read_text

__all__ = ["parse_lines", "parse_array", "read_records"]


def read_records(path: str | os.PathLike, what: str = "file") -> list[tuple[int, object]]:
    """Return ``(line number, parsed value)`` for every record of a JSON-lines file or JSON array.

    A file whose first non-blank character is ``[`` is read as one JSON array (each
    element's line is the line it starts on); anything else as JSON lines, blank lines
    skipped.

    Raises:
        DataError: the file is missing or a record is malformed (naming ``file:line``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    text = read_text(path)  # UTF-8, BOM dropped; other encodings are a DataError
    return parse_array(path, text) if text.lstrip().startswith("[") else parse_lines(path, text)


def parse_lines(path: Path, text: str) -> list[tuple[int, object]]:
    items = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line)))
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({exc}); fix or remove that line") from None
    return items


def parse_array(path: Path, text: str) -> list[tuple[int, object]]:
    """Parse a JSON array element by element so that errors name the element's line."""
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = text.index("[") + 1
    line, counted = 1, 0  # line number at offset `counted`, advanced incrementally

    def line_at(offset: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    items = []
    while True:
        pos = ws.match(text, pos).end()
        if pos < len(text) and text[pos] == "]":
            break
        lineno = line_at(pos)
        try:
            obj, pos = dec.raw_decode(text, pos)
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON array element ({exc})") from None
        items.append((lineno, obj))
        pos = ws.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            break
        else:
            raise DataError(f"{path}:{line_at(pos)}: expected ',' or ']' in the JSON array")
    if text[pos + 1 :].strip():
        raise DataError(f"{path}:{line_at(pos)}: unexpected data after the JSON array")
    return items
