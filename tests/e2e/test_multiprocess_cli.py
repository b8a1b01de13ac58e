"""`vlmfix caption` and `vlmfix eval pope` split over two processes (tiny-random model, the
shipped testbed example images) write exactly the files of one process; a rank that fails
makes the launch exit non-zero, and `--resume` finishes the run.

The two processes get RANK / WORLD_SIZE and no rendezvous address, as from a scheduler or
a shell loop, so they meet through files (`vlmfix.shard`); `accelerate launch` and
`torchrun` (a process group) are covered by tests/integration/test_eval_distributed.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "vlmfix" / "testbed" / "examples"

DRIVER = textwrap.dedent(
    """
    import os, sys
    from vlmfix.cli import main

    out, questions, images, task = sys.argv[1:5]
    if os.environ.get("FAIL_RANK") == os.environ.get("RANK", "0"):
        import vlmfix.generation as gen

        real, calls = gen.generate, []

        def failing(*args, **kwargs):  # this rank dies after its first batch
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(*args, **kwargs)

        gen.generate = failing
    common = ["--model", "tiny-random", "--max-new-tokens", "3", "--no-progress", "--batch-size", "2"]
    rc = main(["caption", images, "--out", out + "/captions.jsonl", *common, *sys.argv[5:]])
    if task == "caption+pope" and rc == 0:
        rc = main(["eval", "pope", "--questions", questions, "--images", images, "--out", out + "/pope",
                   "--bootstrap", "20", *common])
    sys.exit(rc)
    """
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiproc")
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    cats = sorted({o["category"] for e in examples for o in e["objects"]})
    questions, qid = [], 0
    for e in examples:
        present = [o["category"] for o in e["objects"]]
        absent = [c for c in cats if c not in present]
        for cat, label in [(present[0], "yes"), (absent[0], "no"), (present[-1], "yes"), (absent[-1], "no")]:
            qid += 1
            questions.append(
                {"question_id": qid, "image": e["file_name"], "text": f"Is there a {cat} in the image?", "label": label}
            )
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "driver.py").write_text(DRIVER)
    return root


def _env(rank=None, world=None, **extra):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", VLMFIX_SHARD_TIMEOUT="120")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FAIL_RANK"):
        env.pop(name, None)
    if world is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    env.update(extra)
    return env


def _launch(work, out, task, world, *extra, **env):
    """Start ``world`` processes (one when ``world`` is None); return [(rc, stderr)] by rank."""
    args = [
        sys.executable,
        str(work / "driver.py"),
        str(out),
        str(work / "questions.jsonl"),
        str(EXAMPLES),
        task,
        *extra,
    ]
    ranks = [None] if world is None else range(world)
    logs = [out.parent / f"{out.name}.{task}.rank{r}.stderr" for r in ranks]  # files: a full pipe cannot block a rank
    procs = []
    for r, log in zip(ranks, logs):
        with open(log, "w") as fh:
            procs.append(
                subprocess.Popen(args, cwd=work, env=_env(r, world, **env), stdout=subprocess.DEVNULL, stderr=fh)
            )
    try:
        return [(p.wait(timeout=600), log.read_text()) for p, log in zip(procs, logs)]
    finally:
        for p in procs:  # a rank left waiting must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()


def _captions(path: Path) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    for r in recs:
        r.pop("seconds")  # wall time of the batch
    return recs


def _run_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".rank" in p.name or ".shards" in p.name)


@pytest.fixture(scope="module")
def single(work):
    out = work / "single"
    [(rc, err)] = _launch(work, out, "caption+pope", None)
    assert rc == 0, err[-3000:]
    return out


def test_two_processes_write_the_files_of_one(work, single):
    out = work / "two"
    ranks = _launch(work, out, "caption+pope", 2)
    assert [rc for rc, _ in ranks] == [0, 0], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    one, two = _captions(single / "captions.jsonl"), _captions(out / "captions.jsonl")
    assert len(one) == 6 and all("error" not in r for r in one)
    assert all(r.pop("num_processes") == 2 for r in two) and two == one  # same records, same order
    assert (out / "pope" / "samples.jsonl").read_bytes() == (single / "pope" / "samples.jsonl").read_bytes()
    a, b = (json.loads((d / "pope" / "results.json").read_text()) for d in (single, out))
    assert b.pop("num_processes") == 2 and "num_processes" not in a
    a.pop("metadata"), b.pop("metadata")  # creation time
    assert a == b
    assert _run_files(out) == [] and _run_files(out / "pope") == []


def test_a_failed_rank_fails_the_launch_and_resume_finishes_it(work, single):
    out = work / "failed"
    ranks = _launch(work, out, "caption", 2, FAIL_RANK="1")
    (rc0, err0), (rc1, err1) = ranks
    assert rc1 != 0 and "CUDA out of memory (simulated)" in err1
    assert rc0 == 2 and "rank 1 of 2 failed: RuntimeError: CUDA out of memory (simulated)" in err0, err0[-3000:]
    assert "re-run the same command to resume" in err0
    assert not (out / "captions.jsonl").exists()
    assert [p for p in _run_files(out) if p.endswith(".part.jsonl")] == [
        "captions.jsonl.rank0-of-2.part.jsonl",
        "captions.jsonl.rank1-of-2.part.jsonl",
    ]
    [(rc, err)] = _launch(work, out, "caption", None)  # without --resume: refused, parts kept
    assert rc == 2 and "--resume" in err
    [(rc, err)] = _launch(work, out, "caption", None, "--resume")
    assert rc == 0, err[-3000:]
    assert "1 captioned" in err and "5 already done" in err  # rank 1 died before its last image
    recs = _captions(out / "captions.jsonl")
    assert sum(r.pop("num_processes", 1) == 2 for r in recs) == 5
    assert recs == _captions(single / "captions.jsonl")  # same records, same order
    assert _run_files(out) == []
