"""`vlmfix caption`: nothing lost, nothing duplicated, nothing silently wrong.

Resume identity by resolved path, refusal to mix settings in one file, the output lock
(against a real second process), error records retried, honest records, and user
errors reported before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_images
from PIL import Image

from vlmfix.cli import main
from vlmfix.io import read_jsonl

BASE = ["--model", "tiny-random", "--max-new-tokens", "2", "--no-progress"]


def _run(*args):
    return main(["caption", *map(str, args), *BASE])


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(make_images(n)):
        im.save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model would be loaded (user errors must come first)."""
    import vlmfix.loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before a user error was reported")

    monkeypatch.setattr(vlmfix.loading, "load", refuse)


def test_resume_with_another_spelling_of_the_path_adds_nothing(tmp_path, monkeypatch):
    d = _images(tmp_path / "imgs")
    out = tmp_path / "c.jsonl"
    monkeypatch.chdir(tmp_path)
    assert _run("imgs", "--out", out) == 0
    assert _run(d.resolve(), "--out", out, "--resume") == 0  # absolute now
    assert _run("./imgs/../imgs", "--out", out, "--resume") == 0
    recs = list(read_jsonl(out))
    assert len(recs) == 3
    assert sorted(r["path"] for r in recs) == [f"imgs/img{i}.png" for i in range(3)]  # as the user wrote it
    assert sorted(r["resolved_path"] for r in recs) == [str(d.resolve() / f"img{i}.png") for i in range(3)]


def test_same_image_named_twice_is_captioned_once(tmp_path):
    d = _images(tmp_path / "imgs", 2)
    out = tmp_path / "c.jsonl"
    assert _run(d, d / "img0.png", d / ".." / "imgs", "--out", out) == 0
    assert len(list(read_jsonl(out))) == 2


@pytest.mark.parametrize(
    "change, named",
    [
        (["--method", "vcd"], "methods"),
        (["--prompt", "Say hi."], "prompt"),
        (["--max-new-tokens", "3"], "generation.max_new_tokens"),
        (["--do-sample"], "generation.do_sample"),
        (["--top-k", "5"], "generation.top_k"),
        (["--seed", "1"], "generation.seed"),
        (["--dtype", "bfloat16"], "dtype"),
        (["--model", "tiny-random:llava_next"], "model_resolved"),
    ],
)
def test_resume_under_other_settings_is_refused_naming_the_setting(tmp_path, capsys, change, named):
    d = _images(tmp_path / "imgs", 2)
    out = tmp_path / "c.jsonl"
    assert main(["caption", str(d), "--out", str(out), *BASE, "--limit", "1"]) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert main(["caption", str(d), "--out", str(out), *BASE, "--resume", *change]) == 2
    err = capsys.readouterr().err
    assert f"other settings: {named} is" in err and "--out" in err
    assert out.read_bytes() == first


def test_a_second_process_is_refused_by_the_lock(tmp_path, capsys, no_model):
    d = _images(tmp_path / "imgs", 1)
    out = tmp_path / "c.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom vlmfix.io import OutputLock\n"
            "OutputLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):  # a fresh run is refused by the lock, not by timing
            assert _run(d, "--out", out, *extra) == 2
            assert f"in use by PID {holder.pid}" in capsys.readouterr().err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the lock with the killed process: the next one takes it
    from vlmfix.io import OutputLock

    with OutputLock(out):
        assert (tmp_path / "c.jsonl.lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / "c.jsonl.lock").exists()  # removed on release


def test_a_running_caption_process_refuses_a_second_run(tmp_path, capsys):
    d = tmp_path / "many"
    d.mkdir()
    for i, im in enumerate(make_images(8, seed=5)):
        im.save(d / f"{i:03d}.png")
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "vlmfix", "caption", str(d), "--out", str(out), *BASE, "--batch-size", "1"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1) and time.time() < deadline:
            assert first.poll() is None, "the first run ended before writing"
            time.sleep(0.02)
        if first.poll() is None:  # still running: the second run must be refused, with its PID
            assert _run(d, "--out", out, "--resume") == 2
            assert f"in use by PID {first.pid}" in capsys.readouterr().err
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0
    assert _run(d, "--out", out, "--resume") == 0  # lock released: resuming adds nothing
    paths = [r["resolved_path"] for r in read_jsonl(out)]
    assert len(paths) == len(set(paths)) == 8


def test_error_records_are_retried_on_resume(tmp_path, capsys):
    d = _images(tmp_path / "imgs", 2)
    good = (d / "img0.png").read_bytes()
    (d / "broken.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "c.jsonl"
    assert _run(d, "--out", out) == 0
    assert "error" in {Path(r["path"]).name: r for r in read_jsonl(out)}["broken.png"]
    (d / "broken.png").write_bytes(good)  # repaired
    assert _run(d, "--out", out, "--resume", "--keep-errors") == 0  # kept as final on request
    assert sum("error" in r for r in read_jsonl(out)) == 1
    assert _run(d, "--out", out, "--resume") == 0
    assert "1 earlier errors retried" in capsys.readouterr().err
    recs = {Path(r["path"]).name: r for r in read_jsonl(out)}
    assert len(list(read_jsonl(out))) == 3 and "error" not in recs["broken.png"] and "text" in recs["broken.png"]


def test_a_run_where_every_image_failed_exits_nonzero(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_text("not a png")
    (d / "b.jpg").write_bytes(b"\xff\xd8\xff")
    assert _run(d, "--out", tmp_path / "c.jsonl") == 1
    assert "every image failed" in capsys.readouterr().err


def test_records_state_everything_that_shaped_them(tmp_path):
    d = _images(tmp_path / "imgs", 3)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "tiny.png")  # a 1x1 image is captioned too
    out = tmp_path / "c.jsonl"
    assert _run(d, "--out", out, "--limit", "3", "--method", "var") == 0
    recs = list(read_jsonl(out))
    assert len(recs) == 3 and all("error" not in r for r in recs)
    r = recs[0]
    assert r["model"] == "tiny-random" and r["model_resolved"] == "tiny-random:llava" and r["dtype"] == "float32"
    assert r["generation"] == {
        "max_new_tokens": 2,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 0,
        "backend": "reference",
    }
    assert r["inputs"] == {"paths": [str(d)], "limit": 3, "images_found": 4}
    assert r["methods"][0]["name"] == "var" and r["methods"][0]["tau"] == 20.0
    # telemetry is saved, and VAR's paper tau on this 64-wide LM (|RMSNorm(x)| <= 8) is flagged
    var = r["method_stats"]["var"]
    assert var["sinks_per_layer"] == {"2": 0} and var["rows_redistributed"] == 0
    assert any("0 sink tokens" in w and "tau=20.0" in w for w in r["method_warnings"])


def test_one_pixel_image_gets_a_caption(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "px.png")
    out = tmp_path / "c.jsonl"
    assert _run(d, "--out", out) == 0
    (rec,) = read_jsonl(out)
    assert "error" not in rec and isinstance(rec["text"], str) and rec["num_tokens"] >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "vcd", "--method-config", "alpha=abc"], "alpha='abc' (str) is invalid; alpha takes a float"),
        (["--method", "vcd", "--method-config", "alpha=true"], "alpha=True (bool) is invalid"),
        (["--method", "icd", "--method-config", "disturbance=123"], "disturbance=123 (int) is invalid"),
        (["--method", "vcd", "--method", "vcd"], "given more than once"),
        (["--dtype", "float8"], "dtype='float8' is not supported"),
        (["--device", "tpu"], "--device 'tpu' is not"),
        (["--temperature", "0"], "--temperature 0.0 must be > 0"),
    ],
)
def test_user_errors_are_reported_before_the_model_loads(tmp_path, capsys, no_model, args, message):
    d = _images(tmp_path / "imgs", 1)
    assert _run(d, "--out", tmp_path / "c.jsonl", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "c.jsonl").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_decode_path_graph_without_cuda_is_a_clear_error(tmp_path, capsys, no_model):
    d = _images(tmp_path / "imgs", 1)
    assert _run(d, "--out", tmp_path / "c.jsonl", "--decode-path", "graph") == 2
    assert "use decode_path='static'" in capsys.readouterr().err


def test_decode_path_reaches_generate_and_the_record(tmp_path, monkeypatch):
    import json

    import vlmfix.generation

    seen, original = [], vlmfix.generation.generate

    def spy(*a, **k):  # caption imports generate from vlmfix.generation at call time
        seen.append(k.get("decode_path"))
        return original(*a, **k)

    monkeypatch.setattr(vlmfix.generation, "generate", spy)
    d = _images(tmp_path / "imgs", 1)
    out = tmp_path / "c.jsonl"
    assert _run(d, "--out", out, "--decode-path", "static") == 0
    assert seen == ["static"]
    header = json.loads(out.read_text().splitlines()[0])
    assert "static" in json.dumps(header)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys, no_model):
    d = _images(tmp_path / "imgs", 1)
    assert _run(d, "--out", tmp_path / "c.jsonl", "--device", "cuda") == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_invalid_out_is_reported_before_the_model_loads(tmp_path, capsys, no_model):
    d = _images(tmp_path / "imgs", 1)
    (tmp_path / "a_file").write_text("x")
    for out, message in (
        (tmp_path / "a_file" / "c.jsonl", "is a file, so"),
        (tmp_path, "is a folder; pass a file name"),
        (str(tmp_path / "sub") + "/", "not a valid file name"),
    ):
        assert _run(d, "--out", out) == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_folder_is_reported_before_the_model_loads(tmp_path, capsys, no_model):
    d = _images(tmp_path / "imgs", 1)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _run(d, "--out", ro / "c.jsonl") == 2
        assert "no permission to write" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("limit", ["-1", "0", "x"])
def test_bad_limit_is_a_usage_error(tmp_path, capsys, no_model, limit):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, "--out", tmp_path / "c.jsonl", "--limit", limit)
    assert exc.value.code == 2 and "--limit" in capsys.readouterr().err


def test_methods_output_piped_is_complete(capsys):
    """`vlmfix methods | head -n 1`: the pipe's reader gets real content, no traceback."""
    import vlmfix

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in vlmfix.methods.available():
        assert f"\n{name}: " in "\n" + listing
    assert "    tau = 20.0" in listing and "    alpha = 1.0" in listing
    piped = subprocess.run(
        f"{sys.executable} -m vlmfix methods | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert piped.stdout == listing.splitlines(keepends=True)[0] and piped.stdout.strip()
    assert "Traceback" not in piped.stderr and "Error" not in piped.stderr
    assert main(["methods", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vcd"]["alpha"] == 1.0
