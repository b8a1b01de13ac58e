"""Output lock, writability checks, error-record removal and text decoding in vlmfix.io."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlmfix.errors import DataError, StateError
from vlmfix.io import OutputLock, check_writable, drop_records, read_jsonl, read_text


def test_lock_is_exclusive_across_processes_and_released_on_exit(tmp_path):
    out = tmp_path / "c.jsonl"
    probe = (
        "import sys\nfrom vlmfix.io import OutputLock\n"
        "try:\n    OutputLock(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(e)\nelse:\n    print('got it')\n"
    )
    with OutputLock(out):
        with OutputLock(out):  # re-entrant in one process
            pass
        assert (tmp_path / "c.jsonl.lock").read_text().strip() == str(os.getpid())
        other = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, timeout=60)
        assert f"is in use by PID {os.getpid()}" in other.stdout
    assert not (tmp_path / "c.jsonl.lock").exists()
    other = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "got it"


def test_folder_lock_and_lock_error_type(tmp_path):
    run = tmp_path / "run"
    with OutputLock(run, folder=True) as lock:
        assert lock.path == run / ".vlmfix.lock" and lock.path.is_file()
    assert issubclass(StateError, RuntimeError)


def test_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "c.jsonl"
    (tmp_path / "c.jsonl.lock").write_text("999999\n")  # left by a killed run: no flock held
    with OutputLock(out):
        assert (tmp_path / "c.jsonl.lock").read_text().strip() == str(os.getpid())


def test_check_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    assert check_writable(tmp_path / "new" / "deeper" / "c.jsonl") == tmp_path / "new" / "deeper" / "c.jsonl"
    assert check_writable(tmp_path / "run", folder=True)
    with pytest.raises(DataError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(DataError, match="is a file, not a folder"):
        check_writable(tmp_path / "f", folder=True)
    with pytest.raises(DataError, match="is a file, so"):
        check_writable(tmp_path / "f" / "c.jsonl")
    with pytest.raises(DataError, match="not a valid file name"):
        check_writable("")


def test_drop_records_keeps_everything_else_byte_for_byte(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"path": "a", "text": "x"}), json.dumps({"path": "b", "error": "bad"}), "{torn"]
    path.write_text("\n".join(lines) + "\n")
    assert drop_records(path, lambda r: "error" in r) == 1
    assert path.read_text() == lines[0] + "\n" + lines[2] + "\n"
    assert drop_records(path, lambda r: "error" in r) == 0
    assert drop_records(tmp_path / "absent.jsonl", lambda r: True) == 0


def test_read_text_and_jsonl_handle_bom_and_name_a_wrong_encoding(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n{"a": 2}\n')
    assert read_text(bom).startswith('{"a"')
    assert [r["a"] for r in read_jsonl(bom)] == [1, 2]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8 text .*re-save"):
        read_text(latin)
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8"):
        list(read_jsonl(latin))
