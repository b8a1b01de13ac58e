"""`vlmfix caption`: error records, resume, interruption (in-process and by signal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_images

from vlmfix.cli import main
from vlmfix.io import read_jsonl


def _folder(tmp_path: Path, n_good: int = 5) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i, im in enumerate(make_images(n_good)):
        im.save(d / ("sub" if i % 2 else "") / f"img{i}.png")
    (d / "notes.txt").write_text("not an image, skipped by the folder walk")
    (d / "fake.jpg").write_text("this is text, not a JPEG")
    good = d / "img0.png"
    data = good.read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    make_images(1)[0].resize((400, 400)).save(d / "huge.png")  # over --max-pixels below
    return d


def _run(args):
    return main(["caption", *args, "--model", "tiny-random", "--max-new-tokens", "4", "--no-progress"])


def test_caption_folder_with_bad_files(tmp_path):
    d = _folder(tmp_path)
    out = tmp_path / "captions.jsonl"
    assert _run([str(d), "--out", str(out), "--batch-size", "2", "--max-pixels", "100000"]) == 0
    recs = list(read_jsonl(out))
    by_path = {Path(r["path"]).name: r for r in recs}
    assert len(recs) == len(by_path) == 8
    for i in range(5):
        r = by_path[f"img{i}.png"]
        assert "error" not in r and isinstance(r["text"], str)
        assert r["model"] == "tiny-random" and r["methods"] == [] and r["seed"] == 0
        assert r["prompt"] and r["versions"]["transformers"]
    assert "not an image" in by_path["fake.jpg"]["error"]
    assert "truncated" in by_path["truncated.png"]["error"] or "corrupt" in by_path["truncated.png"]["error"]
    assert "decompression bomb" in by_path["huge.png"]["error"]
    assert "raise the limit: vlmfix caption --max-pixels N" in by_path["huge.png"]["error"]  # says how
    assert "notes.txt" not in by_path


def test_refuses_to_overwrite_and_resume_adds_nothing(tmp_path, capsys):
    d = _folder(tmp_path, 3)
    out = tmp_path / "c.jsonl"
    assert _run([str(d), "--out", str(out)]) == 0
    first = out.read_bytes()
    assert _run([str(d), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert _run([str(d), "--out", str(out), "--resume", "--keep-errors"]) == 0
    assert out.read_bytes() == first  # nothing to do: every image has its record
    assert _run([str(d), "--out", str(out), "--resume"]) == 0  # retries the 2 bad files only
    before = [json.loads(line) for line in first.splitlines()]
    after = list(read_jsonl(out))
    assert len(after) == len(before) == 6 and len({r["resolved_path"] for r in after}) == 6
    good = [line for line in first.splitlines() if b'"error"' not in line]
    assert out.read_bytes().splitlines()[: len(good)] == good  # captions untouched, in place
    assert sorted(Path(r["path"]).name for r in before if "error" in r) == ["fake.jpg", "truncated.png"]


def test_interrupted_run_resumes_exactly_once(tmp_path, monkeypatch):
    import vlmfix.generation as gen

    d = _folder(tmp_path, 5)
    out = tmp_path / "c.jsonl"
    real = gen.generate
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "generate", flaky)
    assert _run([str(d), "--out", str(out), "--batch-size", "2"]) == 130
    partial = list(read_jsonl(out))
    assert 0 < len(partial) < 8
    monkeypatch.setattr(gen, "generate", real)
    assert _run([str(d), "--out", str(out), "--batch-size", "2", "--resume"]) == 0
    paths = [r["path"] for r in read_jsonl(out)]
    assert len(paths) == len(set(paths)) == 8


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_process_leaves_resumable_file(tmp_path, sig):
    d = tmp_path / "many"
    d.mkdir()
    for i, im in enumerate(make_images(40, seed=3)):
        im.save(d / f"{i:03d}.png")
    out = tmp_path / "c.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "vlmfix",
        "caption",
        str(d),
        "--out",
        str(out),
        "--model",
        "tiny-random",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "16",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"caption exited early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130
        lines = out.read_bytes().splitlines()
        assert all(json.loads(line) for line in lines)  # every line valid
    n_before = len(list(read_jsonl(out, strict=False)))
    assert 3 <= n_before < 40
    assert (
        main(
            [
                "caption",
                str(d),
                "--out",
                str(out),
                "--model",
                "tiny-random",
                "--batch-size",
                "8",
                "--max-new-tokens",
                "16",  # the killed run's setting: resuming under another is refused
                "--no-progress",
                "--resume",
            ]
        )
        == 0
    )
    paths = [r["path"] for r in read_jsonl(out)]
    assert len(paths) == len(set(paths)) == 40


def test_methods_command(capsys):
    assert main(["methods"]) == 0
    assert "baseline" in capsys.readouterr().out
    assert main(["methods", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["baseline"] == {"name": "baseline"}


def test_unknown_method_is_a_clear_error(tmp_path, capsys):
    d = _folder(tmp_path, 1)
    assert _run([str(d), "--out", str(tmp_path / "x.jsonl"), "--method", "vcdd"]) == 2
    assert "unknown method 'vcdd'" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_missing_path_is_a_clear_error(tmp_path, capsys):
    assert _run([str(tmp_path / "nope"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_methods_output_piped_into_head_exits_cleanly(tmp_path, monkeypatch):
    class ClosedPipe:
        """stdout whose reader went away (like `vlmfix methods | head -1`)."""

        def __init__(self, fd):
            self.fd = fd

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return self.fd

    with open(tmp_path / "out", "w") as fh:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(fh.fileno()))
        assert main(["methods"]) == 0
