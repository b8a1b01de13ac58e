"""Crash-safe JSON lines."""

from __future__ import annotations

import json

import pytest

from vlmfix.errors import DataError
from vlmfix.io import JsonlWriter, done_keys, read_jsonl, repair_jsonl


def test_write_read_and_resume(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlWriter(p) as w:
        w.write({"k": 1})
        w.write({"k": 2, "t": "é"})
    # a torn write: half a record without newline
    with open(p, "ab") as fh:
        fh.write(b'{"k": 3, "te')
    assert done_keys(p, "k") == {1, 2}
    with JsonlWriter(p) as w:  # opening repairs first
        w.write({"k": 3})
    assert [r["k"] for r in read_jsonl(p)] == [1, 2, 3]


def test_repair_cuts_complete_but_corrupt_last_line(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": \n')
    assert repair_jsonl(p) == len(b'{"a": \n')
    assert p.read_bytes() == b'{"a": 1}\n'
    assert repair_jsonl(tmp_path / "absent.jsonl") == 0


def test_strict_read_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\nnot json\n[1]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        list(read_jsonl(p))
    assert list(read_jsonl(p, strict=False)) == [{"a": 1}]


def test_write_outside_context_raises(tmp_path):
    with pytest.raises(RuntimeError, match="before open"):
        JsonlWriter(tmp_path / "x.jsonl").write({})


def test_serialises_tensors_and_paths(tmp_path):
    import torch

    p = tmp_path / "o.jsonl"
    with JsonlWriter(p) as w:
        w.write({"t": torch.tensor([1, 2]), "s": torch.tensor(3.5), "p": tmp_path})
    rec = json.loads(p.read_text())
    assert rec["t"] == [1, 2] and rec["s"] == 3.5 and rec["p"] == str(tmp_path)


def test_read_json_errors_name_the_file(tmp_path):
    from vlmfix.io import read_json

    good = tmp_path / "g.json"
    good.write_text('{"a": [1]}')
    assert read_json(good) == {"a": [1]}
    bad = tmp_path / "b.json"
    bad.write_text("{oops")
    with pytest.raises(DataError, match=r"b.json: not valid JSON"):
        read_json(bad)
    with pytest.raises(DataError, match="custom message"):
        read_json(tmp_path / "none.json", missing="custom message")
