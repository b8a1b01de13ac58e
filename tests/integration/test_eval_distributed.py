"""Data-parallel evaluation: 2 CPU processes started by `accelerate launch` (and by
`torchrun`, which accelerate's `--multi_gpu` launcher wraps) give the same samples and
results as one process.

On a CPU-only host `accelerate launch --cpu --num_processes 2` runs ONE process (its
simple launcher only fans out through `mpirun`), so the test uses
`accelerate launch --multi_gpu --num_processes 2`: that path starts the ranks with
`torch.distributed.run`, and `PartialState(cpu=True)` joins them over gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from PIL import Image
    from vlmfix.eval.chair import image_samples, load_ground_truth, run_chair
    from vlmfix.eval.pope import build_questions, run_pope
    from vlmfix.eval.runner import dist_context

    root, out = Path(sys.argv[1]), Path(sys.argv[2])

    def fake_answer(images, prompts):
        return ["Yes" if (im.getpixel((0, 0))[0] + len(p)) % 3 else "No" for im, p in zip(images, prompts)]

    def fake_caption(images, prompts):
        names = ["dog", "cat", "car", "person", "cup"]
        return [f"A {names[im.getpixel((0, 0))[0] % 5]} next to a {names[im.getpixel((0, 0))[0] % 3]}." for im in images]

    ctx = dist_context()
    splits = {s: build_questions(root / "instances_val2014.json", s, n_images=7, seed=0) for s in ("random", "popular")}
    res = run_pope(splits, root / "images", out / "pope", fake_answer, batch_size=2, ctx=ctx)
    gt = load_ground_truth(root / "gt.json")
    chair = run_chair(image_samples(root / "images", gt, n=9, seed=1), gt, out / "chair", fake_caption, batch_size=2, ctx=ctx)
    print(json.dumps({"rank": ctx.rank, "world": ctx.world_size, "main": res is not None and chair is not None}))
    """
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cats = ["person", "dog", "cat", "car", "cup", "bus", "tv", "kite", "sink", "bed"]
    (root / "images").mkdir()
    images, anns, truth = [], [], {}
    for i in range(1, 12):
        name = f"COCO_val2014_{i:012d}.jpg"
        from PIL import Image

        Image.new("RGB", (4, 4), (7 * i, 0, 0)).save(root / "images" / name)
        images.append({"id": i, "file_name": name})
        chosen = [cats[(i + k) % len(cats)] for k in range(3 + i % 2)]
        truth[i] = chosen
        for c in chosen:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": cats.index(c) + 1,
                    "bbox": [0, 0, 1, 1],
                    "area": 1,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(cats)]
    (root / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories})
    )
    (root / "gt.json").write_text(json.dumps(truth))
    (root / "run.py").write_text(SCRIPT)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, cwd):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _strip(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("metadata", "num_processes")}


def _launch_cmd(launcher: str, script: Path, args: list[str]) -> list[str]:
    port = str(_free_port())
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", port, str(script), *args]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
            str(script), *args]  # fmt: skip


@pytest.fixture(scope="module")
def single(workdir):
    ranks = _run([sys.executable, str(workdir / "run.py"), str(workdir), str(workdir / "single")], workdir)
    assert ranks == [{"rank": 0, "world": 1, "main": True}]
    return workdir / "single"


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_equal_one(workdir, single, launcher):
    multi = workdir / f"multi-{launcher}"
    ranks = _run(_launch_cmd(launcher, workdir / "run.py", [str(workdir), str(multi)]), workdir)
    assert sorted((r["rank"], r["world"], r["main"]) for r in ranks) == [(0, 2, True), (1, 2, False)]
    for task in ("pope", "chair"):
        one, two = single / task, multi / task
        assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
        assert sorted(p.name for p in two.iterdir() if ".rank" in p.name or ".shards" in p.name) == []  # cleaned up
        a = json.loads((one / "results.json").read_text())
        b = json.loads((two / "results.json").read_text())
        assert _strip(a) == _strip(b)
        assert "num_processes" not in a and b["num_processes"] == 2
    assert json.loads((multi / "pope" / "results.json").read_text())["splits"]["random"]["count"] == 42
