"""Crash-safe JSON-lines output shared by the caption CLI and the evaluators.

Records are appended one line per ``os.write`` on an ``O_APPEND`` descriptor and synced,
so an interrupted run leaves at most one partial last line. :func:`repair_jsonl` cuts
such a line off before a resumed run appends, and :func:`read_jsonl` reads every
complete record, so a resumed run neither duplicates nor drops records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from vlmfix.errors import DataError, StateError

__all__ = [
    "JsonlWriter",
    "OutputLock",
    "read_json",
    "read_jsonl",
    "read_text",
    "repair_jsonl",
    "done_keys",
    "drop_records",
    "check_writable",
    "shipped_yaml",
]


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


def shipped_yaml(spec: str | os.PathLike, directory: Path) -> Path:
    """``spec`` as a path, or ``directory/<spec>.yaml`` when ``spec`` is a bare name (no
    suffix, no such file here) of a YAML file shipped there (presets, suites, tasks)."""
    path = Path(spec)
    if not path.exists() and not path.suffix and (directory / f"{path}.yaml").is_file():
        return directory / f"{path}.yaml"
    return path


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file written by any editor: a leading byte-order mark is dropped.

    Raises:
        DataError: the file is not UTF-8 (e.g. Latin-1), naming the first bad byte's line
            and how to fix it.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}; "
            "Latin-1 / Windows-1252?); re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


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
        return json.loads(read_text(path))
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
    if raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark from a Windows editor
        raw = raw[3:]
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except UnicodeDecodeError:
            if strict:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (Latin-1 / Windows-1252?); re-save the file as UTF-8"
                ) from None
            continue
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

    def sync(self) -> None:
        """Flush everything written so far to disk (``os.fsync``)."""
        if self._fd is not None:
            os.fsync(self._fd)

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


def drop_records(path: str | os.PathLike, drop: Callable[[dict[str, Any]], bool]) -> int:
    """Atomically rewrite a JSON-lines file without the records for which ``drop`` is true.

    Used to retry error records on resume: the old record goes only once its
    replacement can be appended, never leaving a sample with two records. Malformed
    lines are kept as they are (``read_jsonl`` reports them).

    Returns:
        The number of records removed.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept: list[bytes] = []
    removed = 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        if isinstance(rec, dict) and drop(rec):
            removed += 1
        else:
            kept.append(line)
    if removed:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return removed


def check_writable(path: str | os.PathLike, *, folder: bool = False, option: str = "--out") -> Path:
    """Check, before any slow work, that ``path`` can be created or appended to.

    Args:
        path: an output file (``folder=False``) or a run folder (``folder=True``).
        option: the command-line option named in the message.

    Raises:
        DataError: the path is the wrong kind (a folder where a file is expected or
            the reverse), sits under a file, or its folder is not writable.
    """
    p = Path(path)
    if str(path) == "" or (not folder and str(path).endswith(os.sep)):
        raise DataError(f"{option} {str(path)!r} is not a valid file name; pass e.g. {option} captions.jsonl")
    if folder and p.exists() and not p.is_dir():
        raise DataError(f"{option} {p} is a file, not a folder; choose a folder for the run")
    if not folder and p.is_dir():
        raise DataError(f"{option} {p} is a folder; pass a file name such as {p / 'captions.jsonl'}")
    target = p if (folder and p.is_dir()) else p.parent
    existing = target
    while not existing.exists():  # the closest existing ancestor decides
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{option} {p}: {existing} is a file, so {target} cannot be created; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{option} {p}: no permission to write in {existing}; choose a writable location")
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise DataError(f"{option} {p} is not writable; fix its permissions or choose another file")
    return p


class OutputLock:
    """Exclusive advisory lock on an output (a JSON-lines file or a run folder).

    Two runs appending to the same output would duplicate work, so the second one is
    refused at once with the holder's PID. The lock is ``fcntl.flock`` on a side file
    (``<file>.lock``, or ``<folder>/.vlmfix.lock``) holding the PID; the kernel releases it
    when the process dies, however it dies, so a stale lock file never blocks a run.
    Re-entrant within one process (nested ``with`` on the same output is fine).

    Example:
        >>> with OutputLock("captions.jsonl"):  # doctest: +SKIP
        ...     ...
    """

    _held: dict[str, list] = {}  # lock path -> [fd, depth], this process

    def __init__(self, output: str | os.PathLike, *, folder: bool = False):
        out = Path(output)
        self.output = out
        self.path = (out / ".vlmfix.lock") if folder else out.with_name(out.name + ".lock")

    def acquire(self) -> OutputLock:
        import fcntl

        key = str(self.path.resolve())
        if key in self._held:
            self._held[key][1] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    pid = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                finally:
                    os.close(fd)
                raise StateError(
                    f"{self.output} is in use by PID {pid} (another vlmfix run holds {self.path}); "
                    "wait for it to finish or stop it, or choose another --out"
                ) from None
            # The holder before us may have unlinked the file after we opened it: then our
            # lock is on a dead inode and a third run could lock the new file. Retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._held[key] = [fd, 1]
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        entry = self._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del self._held[key]
        try:
            os.unlink(self.path)  # while still locked, so nobody can lock it in between
        except FileNotFoundError:
            pass
        os.close(entry[0])

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
