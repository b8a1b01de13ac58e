"""The eval sample loop over several ranks (threads of one process meeting through files,
as processes started without a process group do): same file as one process, resume after
a failed rank, and part files of earlier vlmfix versions."""

from __future__ import annotations

import os
import threading
import uuid

from PIL import Image

from vlmfix.errors import ShardError
from vlmfix.eval.runner import Sample, add_telemetry, run_samples
from vlmfix.io import read_jsonl
from vlmfix.shard import DistContext, part_files


def _samples(folder, n=11):
    folder.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"im{i}.png"
        if i != 4:  # one missing image: an error record
            Image.new("RGB", (4, 4), (20 * i, 0, 0)).save(path)
        out.append(Sample(key=f"q{i}", meta={"i": i}, image_path=path, prompt=f"question {i}"))
    return out


class FakeModel:
    """``generate_fn`` whose answer depends on the image and prompt only; counts calls."""

    def __init__(self, fail_on_rank1_after=None):
        self.calls: list[str] = []
        self.fail_after = fail_on_rank1_after
        self.telemetry: dict = {}

    def __call__(self, images, prompts):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("CUDA out of memory (simulated)")
        self.calls += prompts
        add_telemetry(self.telemetry, {"m": {"edited": len(prompts)}})
        return [f"{'Yes' if im.getpixel((0, 0))[0] % 40 else 'No'} to {p}" for im, p in zip(images, prompts)]


def _finish(sample, text):
    return {"answer": text}


def _launch(samples, out, world, models, **kw):
    results: dict[int, object] = {}

    def target(rank):
        ctx = DistContext(rank=rank, world_size=world)
        try:
            tel = models[rank].telemetry
            results[rank] = run_samples(samples, out, models[rank], _finish, ctx=ctx, telemetry=tel, **kw)
        except BaseException as exc:  # collected for the test
            results[rank] = exc

    _run_ranks(world, target)
    return results


def _run_ranks(world: int, target) -> None:
    """Run ``target(rank)`` for every rank, each in a thread, as one launch."""
    # Threads share one process start time, so a start file left by the previous launch
    # would look fresh to them (processes started later reject it): pin this launch's id.
    os.environ["VLMFIX_RUN_ID"] = uuid.uuid4().hex
    try:
        threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        del os.environ["VLMFIX_RUN_ID"]


def test_two_ranks_give_the_file_of_one_process(tmp_path):
    samples = _samples(tmp_path / "img")
    single = FakeModel()
    run_samples(samples, tmp_path / "one", single, _finish, batch_size=2, ctx=DistContext())
    models = [FakeModel(), FakeModel()]
    res = _launch(samples, tmp_path / "two", 2, models, batch_size=2)
    assert isinstance(res[0], list) and res[1] is None
    assert (tmp_path / "two" / "samples.jsonl").read_bytes() == (tmp_path / "one" / "samples.jsonl").read_bytes()
    assert sorted(models[0].calls + models[1].calls) == sorted(single.calls)  # each sample once
    assert abs(len(models[0].calls) - len(models[1].calls)) <= 1
    assert models[0].telemetry["methods"]["m"]["sums"]["edited"] == 10  # rank 0 holds every rank's sum
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["samples.jsonl"]  # parts, markers gone


def test_resume_after_a_failed_rank_loses_and_repeats_nothing(tmp_path):
    samples = _samples(tmp_path / "img")
    run_samples(samples, tmp_path / "one", FakeModel(), _finish, ctx=DistContext())
    out = tmp_path / "run"
    res = _launch(samples, out, 2, [FakeModel(), FakeModel(fail_on_rank1_after=2)])
    assert isinstance(res[1], RuntimeError)
    assert isinstance(res[0], ShardError) and "rank 1 of 2 failed" in str(res[0])
    assert len(part_files(out / "samples.jsonl")) == 2  # kept: 5 + 2 records (with one error record)
    # Resume on three ranks: the 4 samples left (q5, q7, q9, and q4 whose error record is
    # retried) are split over them; nothing finished is redone.
    models = [FakeModel(), FakeModel(), FakeModel()]
    res = _launch(samples, out, 3, models)
    assert isinstance(res[0], list), res
    assert [m.calls for m in models] == [["question 9"], ["question 5"], ["question 7"]]
    assert (out / "samples.jsonl").read_bytes() == (tmp_path / "one" / "samples.jsonl").read_bytes()
    assert not part_files(out / "samples.jsonl")


def test_a_single_process_folds_in_part_files_of_any_launch(tmp_path):
    samples = _samples(tmp_path / "img", n=6)
    run_samples(samples, tmp_path / "one", FakeModel(), _finish, ctx=DistContext())
    ref = list((tmp_path / "one" / "samples.jsonl").read_text().splitlines())
    out = tmp_path / "run"
    out.mkdir()
    # q0 from a current-style part, q1 from a pre-part-file vlmfix, q2 in both (no duplicate).
    (out / "samples.jsonl.rank0-of-4.part.jsonl").write_text(ref[0] + "\n" + ref[2] + "\n")
    (out / "samples.rank1.jsonl").write_text(ref[1] + "\n" + ref[2] + "\n")
    model = FakeModel()
    run_samples(samples, out, model, _finish, ctx=DistContext())
    assert sorted(model.calls) == [f"question {i}" for i in (3, 5)]  # q4 is the missing image
    assert (out / "samples.jsonl").read_text().splitlines() == ref
    assert sorted(p.name for p in out.iterdir()) == ["samples.jsonl"]


def test_caption_ranks_started_late_do_not_take_this_launchs_parts_for_leftovers(tmp_path, monkeypatch):
    """A rank that reaches the output after rank 0 has started writing its part file must
    not refuse the run as 'interrupted' (the check belongs to rank 0, before the start)."""
    import time

    import vlmfix.generation
    from vlmfix.caption import caption_files
    from vlmfix.generation import GenerationOutput

    def fake_generate(model, processor, images, prompts, methods, **kw):
        return GenerationOutput(texts=[f"{im.size}" for im in images], token_ids=[[1, 2]] * len(images))

    monkeypatch.setattr(vlmfix.generation, "generate", fake_generate)
    monkeypatch.setenv("VLMFIX_SHARD_TIMEOUT", "10")
    _samples(tmp_path / "img", n=6)
    files = sorted((tmp_path / "img").glob("*.png"))
    out = tmp_path / "captions.jsonl"
    results: dict[int, object] = {}

    def rank(r: int) -> None:
        if r == 1:  # arrives once rank 0 is writing its part
            deadline = time.monotonic() + 20
            while not (tmp_path / "captions.jsonl.rank0-of-2.part.jsonl").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        try:
            results[r] = caption_files(
                None, None, files, out, prompt="p", methods=[], metadata={}, batch_size=1,
                progress=False, ctx=DistContext(r, 2),
            )  # fmt: skip
        except BaseException as exc:  # collected for the test
            results[r] = exc

    _run_ranks(2, rank)
    assert results[0] == {"done": 5, "errors": 0, "skipped": 0, "retried": 0}, results
    assert [r["path"] for r in read_jsonl(out)] == [str(f) for f in files]
