"""POPE questions/s on one GPU vs several (data parallel), and a device_map check.

Offline, no download: builds a randomly initialised full-size LLaVA-1.5-7B from its config
(``bench_contrastive.build_llava_7b``: CLIP ViT-L/14-336 + Llama-2-7B, fp16), saves it with
``save_pretrained`` to ``--workdir`` so every process can load it (``vlmfix.load``), and
writes a synthetic POPE question file over generated images (``{question_id, image, text,
label}`` JSON lines, six questions per image, as ``vlmfix eval pope --questions`` reads
them). Both are reused by later runs.

Then it measures, for 1 process on one GPU and for N processes on N GPUs
(``torchrun --standalone --nproc_per_node N``, one model per GPU, ``vlmfix.shard``):

* **generation**: each process loads its model and warms up; after a barrier, rank 0
  times :func:`vlmfix.eval.pope.run_pope` over every question (split, generate, merge,
  score): questions/s and the speed-up over one GPU; the merged ``samples.jsonl`` of N
  processes must equal the one-process file (same answers, same order);
* **end to end** (unless ``--skip-cli``): wall time of the real command,
  ``vlmfix eval pope ...`` and ``torchrun ... -m vlmfix eval pope ...``, process start and
  model loading included.

A random model never emits EOS, so every answer runs to ``--max-new-tokens`` (16, the POPE
default of ``vlmfix eval pope``); real LLaVA answers "Yes"/"No" in 2-3 tokens, so its
questions/s is higher and more prefill-bound. The ratio between 1 and N GPUs is the figure
to read.

``--device-map-check`` (needs 2 GPUs) loads the same checkpoint twice, on one GPU and with
``device_map="auto"`` split over two (``max_memory`` forces the split), and generates with
every registered method on both: the tokens must agree. It prints which methods do.

Usage::

    python benchmarks/bench_multigpu.py                       # 1 GPU vs all visible GPUs
    python benchmarks/bench_multigpu.py --gpus 2 --questions 600 --batch-size 16
    python benchmarks/bench_multigpu.py --device-map-check    # also the device_map check
    python benchmarks/bench_multigpu.py --gpus 1              # the one-GPU questions/s alone
    python benchmarks/bench_multigpu.py --tiny                # CPU dry run (tiny model, 2 CPU processes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

POPE_OBJECTS = [
    "person", "dog", "cat", "car", "bus", "chair", "cup", "bottle", "bicycle", "bird",
    "horse", "sheep", "cow", "truck", "boat", "bench", "kite", "clock", "vase", "book",
]  # fmt: skip


# ---------------------------------------------------------------------- preparation


def _bench_contrastive():
    """benchmarks/bench_contrastive.py (the 7B builder), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_contrastive", REPO / "benchmarks" / "bench_contrastive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_model(folder: Path, tiny: bool) -> Path:
    """Save a random LLaVA-1.5-7B (or the tiny model) to ``folder`` once."""
    if (folder / "config.json").exists():
        return folder
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if tiny:
        from vlmfix.testing import build_tiny

        model, processor = build_tiny("llava")
    else:
        model, processor = _bench_contrastive().build_llava_7b(torch.device("cuda:0"))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    print(f"# saved the random model to {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    del model
    return folder


def prepare_pope(folder: Path, n_questions: int, image_size: int) -> tuple[Path, Path]:
    """Random images and a POPE question file, six questions (3 yes, 3 no) per image."""
    import numpy as np
    from PIL import Image

    images, questions = folder / "images", folder / f"pope_{n_questions}.jsonl"
    if questions.exists():
        return questions, images
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines, qid = [], 0
    for i in range((n_questions + 5) // 6):
        name = f"synthetic_{i:06d}.jpg"
        pixels = (rng.random((image_size, image_size * 4 // 3, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(images / name, quality=90)
        objects = rng.permutation(POPE_OBJECTS)
        for k in range(6):
            if qid == n_questions:
                break
            qid += 1
            text = f"Is there a {objects[k]} in the image?"
            lines.append({"question_id": qid, "image": name, "text": text, "label": "yes" if k % 2 == 0 else "no"})
    questions.write_text("".join(json.dumps(q) + "\n" for q in lines))
    return questions, images


# ---------------------------------------------------------------------- one process of a run


def worker(args) -> None:
    """Load the model on this rank's device, warm up, then time the sharded POPE run."""
    import torch

    import vlmfix
    from vlmfix.eval.bootstrap import BootstrapSpec
    from vlmfix.eval.pope import load_questions
    from vlmfix.eval.pope.parsers import apply_template
    from vlmfix.eval.pope.task import run_pope
    from vlmfix.shard import dist_context

    ctx = dist_context()
    device = ctx.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN sdpa rebuilds a graph per decode length
    t0 = time.perf_counter()
    model, processor = vlmfix.load(args.model_dir, dtype="float32" if args.tiny else "float16", device=device)
    load_s = time.perf_counter() - t0
    questions = load_questions(args.questions_file)

    def generate(images, prompts):
        return vlmfix.generate(model, processor, images, prompts, max_new_tokens=args.max_new_tokens).texts

    from PIL import Image

    with Image.open(Path(args.images) / questions[0].image) as im:  # warm-up: kernels, allocator
        warm = im.convert("RGB")
    generate([warm] * args.batch_size, [apply_template("llava", questions[0].text)] * args.batch_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    if ctx.barrier is not None:
        ctx.barrier()  # every rank loaded and warm: the clock starts together
    t0 = time.perf_counter()
    results = run_pope(
        {"synthetic": questions},
        args.images,
        args.out,
        generate,
        batch_size=args.batch_size,
        ctx=ctx,
        run_info={"model_id": str(args.model_dir), "generation": {"max_new_tokens": args.max_new_tokens}},
        bootstrap=BootstrapSpec(n_resamples=10),
    )
    run_s = time.perf_counter() - t0
    if results is not None:
        timing = {
            "processes": ctx.world_size,
            "questions": len(questions),
            "load_s": load_s,
            "run_s": run_s,
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
        }
        (Path(args.out) / "timing.json").write_text(json.dumps(timing))


def launch(n: int, cmd: list[str], env: dict, log: Path, module: bool = False) -> float:
    """Run ``cmd`` (a script or, with ``module``, ``-m package``) on ``n`` processes, output
    to ``log``; return the wall seconds."""
    if n == 1:
        full = [sys.executable, *(["-m"] if module else []), *cmd]
    else:
        full = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        full += [*(["-m"] if module else []), *cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(full, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"{tail}\n{' '.join(full)} failed with exit code {proc.returncode} (log: {log})")
    return seconds


# ---------------------------------------------------------------------- device_map check


def device_map_check(model_dir: Path, tiny: bool) -> list[tuple[str, str]]:
    """Tokens of every method: one GPU vs ``device_map="auto"`` over two."""
    import torch

    import vlmfix
    from vlmfix import methods
    from vlmfix.loading import placement

    if not tiny and torch.cuda.device_count() < 2:
        return [("(check)", "skipped: needs 2 GPUs")]
    dtype = "float32" if tiny else "float16"
    one, processor = vlmfix.load(model_dir, dtype=dtype, device="cpu" if tiny else "cuda:0")
    if tiny:  # CPU stand-in: layers past the budget offloaded to disk
        budget = {"max_memory": {"cpu": "600KB"}, "offload_folder": str(model_dir) + "-offload"}
    else:  # about half of the 7B's 13.5 GiB on each GPU
        budget = {"max_memory": {0: "7GiB", 1: "40GiB"}}
    split, _ = vlmfix.load(model_dir, dtype=dtype, device_map="auto", **budget)
    print(f"# device_map check: {placement(split)}; {getattr(split, 'hf_device_map', {})}", flush=True)
    images, prompts = _bench_contrastive().make_batch(2, 32 if tiny else 336)
    rows = []
    for name in methods.available():
        cfg = methods.get(name)()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = vlmfix.generate(one, processor, images, prompts, methods=[cfg], max_new_tokens=8)
                b = vlmfix.generate(split, processor, images, prompts, methods=[cfg], max_new_tokens=8)
            rows.append((name, "same tokens" if a.token_ids == b.token_ids else "DIFFERENT tokens"))
        except Exception as exc:  # reported, the other methods still run
            rows.append((name, f"ERROR {type(exc).__name__}: {str(exc)[:120]}"))
        print(f"# {name}: {rows[-1][1]}", flush=True)
    return rows


# ---------------------------------------------------------------------- driver


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/bench-multigpu", help="model, data and runs (reused)")
    parser.add_argument("--gpus", type=int, default=None, help="processes of the parallel run (default: every GPU)")
    parser.add_argument("--questions", type=int, default=1200, help="POPE questions (6 per image)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per forward (as --batch-size)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length (POPE default 16)")
    parser.add_argument("--skip-cli", action="store_true", help="skip the end-to-end `vlmfix eval pope` timings")
    parser.add_argument("--device-map-check", action="store_true", help="also compare device_map='auto' over 2 GPUs")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, 2 CPU processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--questions-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return worker(args)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --tiny for a CPU dry run")
    n = args.gpus or (2 if args.tiny else torch.cuda.device_count())
    if n < 1:
        raise SystemExit("no GPU visible")
    legs = (1,) if n == 1 else (1, n)  # --gpus 1: the one-GPU figure alone
    work = Path(args.workdir).resolve() / ("tiny" if args.tiny else "llava-1.5-7b-random")
    model_dir = prepare_model(work / "model", args.tiny)
    questions, images = prepare_pope(work, args.questions, 32 if args.tiny else 480)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    common = ["--model-dir", str(model_dir), "--images", str(images), "--batch-size", str(args.batch_size)]
    common += ["--max-new-tokens", str(args.max_new_tokens), *(["--tiny"] if args.tiny else [])]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    timings = {}
    for procs in legs:
        out = work / "runs" / f"{stamp}-api-{procs}"
        run_env = dict(env)
        if procs == 1 and not args.tiny:
            run_env["CUDA_VISIBLE_DEVICES"] = run_env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        script = [str(Path(__file__).resolve()), "--worker", "--out", str(out), *common]
        launch(procs, [*script, "--questions-file", str(questions)], run_env, out.with_suffix(".log"))
        timings[procs] = json.loads((out / "timing.json").read_text())
        timings[procs]["samples"] = (out / "samples.jsonl").read_bytes()
        print(f"# {procs} process(es): {timings[procs]['run_s']:.1f} s", flush=True)
    same = timings[1]["samples"] == timings[n]["samples"]

    cli = {}
    if not args.skip_cli:
        for procs in legs:
            out = work / "runs" / f"{stamp}-cli-{procs}"
            run_env = dict(env)
            if procs == 1 and not args.tiny:
                run_env["CUDA_VISIBLE_DEVICES"] = run_env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            cmd = ["vlmfix", "eval", "pope", "--questions", str(questions), "--images", str(images)]
            cmd += ["--model", str(model_dir), "--dtype", "float32" if args.tiny else "float16"]
            cmd += ["--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens)]
            cmd += ["--out", str(out), "--no-progress", "--bootstrap", "10"]
            cli[procs] = launch(procs, cmd, run_env, out.with_suffix(".log"), module=True)
            print(f"# CLI, {procs} process(es): {cli[procs]:.1f} s wall", flush=True)

    checks = device_map_check(model_dir, args.tiny) if args.device_map_check else []

    t1, q = timings[1], timings[1]["questions"]
    what = "tiny random LLaVA (CPU dry run)" if args.tiny else "random LLaVA-1.5-7B (fp16), saved and loaded"
    print(
        f"\n{what}; {t1['device']}; torch {torch.__version__}; {q} POPE questions, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens per answer (a random model never stops early)\n"
    )
    head = "| processes (GPUs) | model load (s, per process) | POPE run (s) | questions/s | speed-up | end to end, CLI (s) |"
    print(head)
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for procs in legs:
        t = timings[procs]
        e2e = f"{cli[procs]:.1f}" if procs in cli else "-"
        speed = t1["run_s"] / t["run_s"]
        print(f"| {procs} | {t['load_s']:.1f} | {t['run_s']:.1f} | {q / t['run_s']:.2f} | {speed:.2f}x | {e2e} |")
    if n > 1:
        print(f"\nmerged samples.jsonl of {n} processes {'equals' if same else 'DIFFERS FROM'} the one-process file")
    if checks:
        print("\n| method | device_map='auto' split vs one device |\n| --- | --- |")
        for name, verdict in checks:
            print(f"| {name} | {verdict} |")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
