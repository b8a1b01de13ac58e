"""End-to-end POPE and CHAIR runs with a fake deterministic generate function:
results files, resume after interruption, per-sample errors, CLI, reports."""

from __future__ import annotations

import argparse
import json
import random

import pytest
from PIL import Image

from vlmfix.errors import ConfigError, DataError
from vlmfix.eval.bootstrap import BootstrapSpec
from vlmfix.eval.chair import caption_samples, image_samples, load_ground_truth, run_chair
from vlmfix.eval.cli import register
from vlmfix.eval.pope import build_questions, load_questions, run_pope, write_questions
from vlmfix.eval.report import compare_runs, load_results
from vlmfix.io import read_jsonl

CATS = ["person", "dog", "cat", "car", "chair", "cup", "bottle", "bus", "pizza", "tv"]


@pytest.fixture()
def data(tmp_path):
    """12 tiny images, COCO instances + captions, a ground-truth JSON."""
    rng = random.Random(1)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images, anns, truth = [], [], {}
    for i in range(1, 13):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (6, 5), (20 * i, 3 * i, 100)).save(img_dir / name)
        images.append({"id": i, "file_name": name, "width": 6, "height": 5})
        cats = rng.sample(range(len(CATS)), rng.randint(3, 5))
        truth[i] = [CATS[c] for c in cats]
        for c in cats:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c + 1,
                    "bbox": [0, 0, 1, 1],
                    "area": 1,
                    "iscrowd": 0,
                }
            )
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    instances = ann_dir / "instances_val2014.json"
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CATS)]
    instances.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    (tmp_path / "gt.json").write_text(json.dumps({str(k): v for k, v in truth.items()}))
    return {"root": tmp_path, "images": img_dir, "instances": instances, "ann_dir": ann_dir, "truth": truth}


def fake_answer(images, prompts):
    """Deterministic: depends on the image's colour and the prompt."""
    return [
        "Yes" if (im.getpixel((0, 0))[0] // 20 + len(p)) % 3 else "No, there is not."
        for im, p in zip(images, prompts, strict=True)
    ]


def fake_caption(images, prompts):
    out = []
    for im in images:
        k = im.getpixel((0, 0))[0] // 20
        objs = [CATS[k % len(CATS)], CATS[(3 * k) % len(CATS)], "<b>tie</b> & co"]
        out.append(f"A photo with a {objs[0]} and two {objs[1]}s.\nAlso a {objs[2]}.")
    return out


class Interrupt(Exception):
    pass


def interrupting(fn, after_calls):
    calls = {"n": 0}

    def wrapped(images, prompts):
        if calls["n"] >= after_calls:
            raise Interrupt
        calls["n"] += 1
        return fn(images, prompts)

    return wrapped


def _pope_splits(data, n_images=5):
    return {s: build_questions(data["instances"], s, n_images=n_images, seed=0) for s in ("random", "adversarial")}


def _records(run_dir):
    return list(read_jsonl(run_dir / "samples.jsonl"))


# ----------------------------------------------------------------------------- POPE


def test_pope_run_writes_self_describing_results(data, tmp_path):
    splits = _pope_splits(data)
    info = {"model_id": "fake", "methods": [{"name": "var", "p": 0.6}], "generation": {"max_new_tokens": 8, "seed": 0}}
    res = run_pope(splits, data["images"], tmp_path / "run", fake_answer, batch_size=4, run_info=info)
    recs = _records(tmp_path / "run")
    assert len(recs) == 60 and len({r["key"] for r in recs}) == 60
    assert all(r["parser"] == {"name": "pope_official", "version": "1"} for r in recs)
    assert all(r["prompt"].endswith("single word or phrase.") for r in recs)
    on_disk = load_results(tmp_path / "run")
    assert on_disk == json.loads(json.dumps(res))
    for key in (
        "task",
        "splits",
        "mean_f1",
        "parser",
        "metric_version",
        "template",
        "model_id",
        "methods",
        "generation",
    ):
        assert key in on_disk, key
    assert on_disk["methods"] == [{"name": "var", "p": 0.6}]
    # metrics recomputed independently from the records
    for split, m in on_disk["splits"].items():
        rs = [r for r in recs if r["split"] == split]
        tp = sum(r["pred"] == "yes" and r["label"] == "yes" for r in rs)
        assert m["tp"] == tp and m["count"] == 30
        assert m["yes_ratio"] == pytest.approx(sum(r["pred"] == "yes" for r in rs) / 30)
    assert (tmp_path / "run" / "report.md").read_text().count("| random |") == 1
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_pope_interrupted_run_resumes_without_duplicates_or_losses(data, tmp_path):
    splits = _pope_splits(data)
    run_pope(splits, data["images"], tmp_path / "clean", fake_answer, batch_size=4)
    with pytest.raises(Interrupt):
        run_pope(splits, data["images"], tmp_path / "cut", interrupting(fake_answer, 3), batch_size=4)
    partial = _records(tmp_path / "cut")
    assert len(partial) == 12  # three finished batches were kept
    with open(tmp_path / "cut" / "samples.jsonl", "a") as fh:
        fh.write('{"key": "random/99", "split": "ran')  # a torn write from the crash
    calls = []
    run_pope(
        splits, data["images"], tmp_path / "cut", lambda i, p: calls.append(len(p)) or fake_answer(i, p), batch_size=4
    )
    assert sum(calls) == 48  # only the missing samples were generated
    assert _records(tmp_path / "cut") == _records(tmp_path / "clean")
    assert load_results(tmp_path / "cut")["splits"] == load_results(tmp_path / "clean")["splits"]


def test_pope_missing_image_is_a_per_sample_error(data, tmp_path):
    splits = _pope_splits(data)
    victim = splits["random"][0].image
    (data["images"] / victim).unlink()
    res = run_pope(splits, data["images"], tmp_path / "run", fake_answer, batch_size=3)
    errors = [r for r in _records(tmp_path / "run") if "error" in r]
    assert len(errors) == 12 and all("image file not found" in r["error"] for r in errors)
    assert res["n_errors"] == 12 and res["complete"] is False
    assert res["splits"]["random"]["count"] == 24 and res["splits"]["random"]["n_errors"] == 6
    assert "Warning: 12 samples failed" in (tmp_path / "run" / "report.md").read_text()


def test_pope_corrupt_image_is_a_per_sample_error(data, tmp_path):
    splits = {"random": build_questions(data["instances"], "random", n_images=2, seed=0)}
    (data["images"] / splits["random"][0].image).write_bytes(b"not an image")
    run_pope(splits, data["images"], tmp_path / "run", fake_answer)
    errors = [r for r in _records(tmp_path / "run") if "error" in r]
    assert len(errors) == 6


def test_pope_rescoring_with_another_parser_generates_nothing(data, tmp_path):
    splits = _pope_splits(data, n_images=2)

    def shouting(images, prompts):  # "NO" is "yes" for the official parser, "no" otherwise
        return ["NO" if i % 2 else "Yes" for i, _ in enumerate(prompts)]

    first = run_pope(splits, data["images"], tmp_path / "run", shouting, batch_size=4)

    def must_not_run(images, prompts):
        raise AssertionError("nothing should be generated")

    res = run_pope(splits, data["images"], tmp_path / "run", must_not_run, parser="yes_no_unknown")
    assert res["parser"] == {"name": "yes_no_unknown", "version": "1"}
    assert first["splits"]["random"]["yes_ratio"] == 1.0
    assert res["splits"]["random"]["yes_ratio"] == 0.5
    recs = _records(tmp_path / "run")
    assert len(recs) == 24
    assert all(r["parser"]["name"] == "yes_no_unknown" for r in recs)
    assert [r["pred"] for r in recs if r["answer"] == "NO"] == ["no"] * 12


def test_pope_resume_with_other_settings_is_refused(data, tmp_path):
    splits = _pope_splits(data, n_images=2)
    run_pope(splits, data["images"], tmp_path / "run", fake_answer, template="llava")
    with pytest.raises(ConfigError, match="different settings .*template"):
        run_pope(splits, data["images"], tmp_path / "run", fake_answer, template="plain")


def test_pope_resume_with_other_questions_is_refused(data, tmp_path):
    # question ids restart at 1 in every file: a run built with another seed has the same
    # keys but other questions and labels, and must not reuse the stored answers
    splits = {"random": build_questions(data["instances"], "random", n_images=3, seed=0)}
    run_pope(splits, data["images"], tmp_path / "run", fake_answer)
    other = {"random": build_questions(data["instances"], "random", n_images=3, seed=5)}
    assert [q.question_id for q in other["random"]] == [q.question_id for q in splits["random"]]
    with pytest.raises(
        ConfigError, match=r"record for sample 'random/\d+' made from different input \((image|question|label)"
    ):
        run_pope(other, data["images"], tmp_path / "run", fake_answer)
    run_pope(splits, data["images"], tmp_path / "run", fake_answer)  # the same questions still resume


def test_pope_killed_while_writing_a_batch_loses_nothing(data, tmp_path):
    # the process dies after 5 of a batch's 4+4 records reached the disk, mid-line in the 6th
    splits = _pope_splits(data, n_images=2)
    run_pope(splits, data["images"], tmp_path / "clean", fake_answer, batch_size=4)
    clean_lines = (tmp_path / "clean" / "samples.jsonl").read_text().splitlines(keepends=True)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "run_config.json").write_text((tmp_path / "clean" / "run_config.json").read_text())
    (cut / "samples.jsonl").write_text("".join(clean_lines[:5]) + clean_lines[5][:30])
    asked = []
    res = run_pope(splits, data["images"], cut, lambda i, p: asked.extend(p) or fake_answer(i, p), batch_size=4)
    assert len(asked) == len(clean_lines) - 5  # only the unfinished samples were generated
    assert _records(cut) == _records(tmp_path / "clean")
    assert res["splits"] == load_results(tmp_path / "clean")["splits"]


def test_generate_fn_with_wrong_count_is_an_error(data, tmp_path):
    splits = _pope_splits(data, n_images=2)
    with pytest.raises(DataError, match="returned 1 texts for 2 prompts"):
        run_pope(splits, data["images"], tmp_path / "run", lambda i, p: ["Yes"], batch_size=2)


# ----------------------------------------------------------------------------- CHAIR


def test_chair_scores_captions_file_with_error_records(data, tmp_path):
    gt = load_ground_truth(data["root"] / "gt.json")
    caps = tmp_path / "caps.jsonl"
    lines = [
        {"image_id": 1, "caption": "A dog and a cat."},
        {"path": "val/COCO_val2014_000000000002.jpg", "text": "Two men at a table."},
        {"image_id": 999, "caption": "A dog."},  # unknown image id
        {"image_id": 3, "caption": "   "},  # empty caption
        {"image_id": 4, "caption": "An empty street."},  # no mentions
    ]
    caps.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = run_chair(caption_samples(caps, gt), gt, tmp_path / "run")
    recs = _records(tmp_path / "run")
    assert [("error" in r) for r in recs] == [False, False, True, False, False]
    assert "image id 999" in recs[2]["error"]
    # an empty caption is a caption: in CHAIR_s's denominator and Len, and reported
    assert recs[3]["empty"] is True and recs[3]["mentions"] == [] and recs[3]["n_tokens"] == 0
    assert res["n_errors"] == 1 and res["metrics"]["n_captions"] == 4
    assert res["metrics"]["n_empty_captions"] == 1 and res["empty_captions"] == ["3"]
    assert "1 empty captions" in (tmp_path / "run" / "report.md").read_text()
    truth = data["truth"]
    expected_hal = sum(c not in truth[1] for c in ("dog", "cat")) + sum(
        c not in truth[2] for c in ("person", "dining table")
    )
    assert res["metrics"]["n_hallucinated_mentions"] == expected_hal
    assert res["metrics"]["n_mentions"] == 4


def test_chair_captions_file_errors_name_the_line(data, tmp_path):
    gt = load_ground_truth(data["root"] / "gt.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": 1, "caption": "ok"}\n{"image_id": 2, "caption": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        caption_samples(bad, gt)
    bad.write_text('{"image_id": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: needs a string 'caption' or 'text'"):
        caption_samples(bad, gt)


def test_chair_captioning_run_resume_and_html(data, tmp_path):
    gt = load_ground_truth(data["ann_dir"])
    samples = image_samples(data["images"], gt, n=8, seed=3)
    assert len(samples) == 8
    clean = run_chair(samples, gt, tmp_path / "clean", fake_caption, batch_size=3)
    with pytest.raises(Interrupt):
        run_chair(samples, gt, tmp_path / "cut", interrupting(fake_caption, 1), batch_size=3)
    resumed = run_chair(samples, gt, tmp_path / "cut", fake_caption, batch_size=3)
    assert _records(tmp_path / "cut") == _records(tmp_path / "clean")
    assert resumed["metrics"] == clean["metrics"]
    page = (tmp_path / "clean" / "captions.html").read_text()
    assert "<b>tie</b>" not in page and "&lt;" in page and "&amp; co" in page
    assert '<span class="hal" title="tie (hallucinated)">tie</span>' in page
    rec = _records(tmp_path / "clean")[0]
    for h in rec["hallucinated"]:
        assert rec["caption"][h["start"] : h["end"]].lower().startswith(h["word"][:3])
        assert h["category"] not in rec["ground_truth"]


def test_chair_crash_mid_batch_resumes_only_unfinished(data, tmp_path):
    # one image of the second batch is missing: its error record is written before the
    # model crashes on that batch; the restart generates only the two unfinished images
    gt = load_ground_truth(data["ann_dir"])
    samples = image_samples(data["images"], gt, n=6, seed=3)
    samples[4].image_path.unlink()
    clean = run_chair(samples, gt, tmp_path / "clean", fake_caption, batch_size=3)
    with pytest.raises(Interrupt):
        run_chair(samples, gt, tmp_path / "cut", interrupting(fake_caption, 1), batch_size=3)
    partial = _records(tmp_path / "cut")
    assert [r["key"] for r in partial] == [s.key for s in samples[:3]] + [samples[4].key]
    asked = []
    resumed = run_chair(samples, gt, tmp_path / "cut", lambda i, p: asked.extend(p) or fake_caption(i, p), batch_size=3)
    assert len(asked) == 2
    assert _records(tmp_path / "cut") == _records(tmp_path / "clean")
    assert resumed["metrics"] == clean["metrics"] and resumed["n_errors"] == 1


def test_chair_resume_with_other_settings_or_captions_is_refused(data, tmp_path):
    gt = load_ground_truth(data["root"] / "gt.json")
    samples = image_samples(data["images"], gt, n=3, seed=0)
    run_chair(samples, gt, tmp_path / "run", fake_caption, normalizer="lemma")
    with pytest.raises(ConfigError, match="different settings .*normalizer"):
        run_chair(samples, gt, tmp_path / "run", fake_caption, normalizer="plural")
    reworded = image_samples(data["images"], gt, n=3, seed=0, prompt="Describe the image.")
    with pytest.raises(ConfigError, match="made from different input \\(prompt"):
        run_chair(reworded, gt, tmp_path / "run", fake_caption)
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 1, "caption": "A dog."}) + "\n")
    run_chair(caption_samples(caps, gt), gt, tmp_path / "scored")
    caps.write_text(json.dumps({"image_id": 1, "caption": "A cat."}) + "\n")  # same key "0"
    with pytest.raises(ConfigError, match="made from different input \\(caption"):
        run_chair(caption_samples(caps, gt), gt, tmp_path / "scored")


def test_chair_unknown_image_ids_become_error_records(data, tmp_path):
    gt = load_ground_truth(data["root"] / "gt.json")
    Image.new("RGB", (4, 4)).save(data["images"] / "holiday.png")  # no id in the name
    samples = image_samples(data["images"], gt, n=None)
    bad = [s for s in samples if s.error]
    assert [s.key for s in bad] == ["holiday.png"]
    ids = image_samples(data["images"], gt, image_ids=[1, 777])
    assert ids[0].error is None and "no image file for image id 777" in ids[1].error


# ----------------------------------------------------------------------------- CLI and reports


def _cli(argv, generate_fn=None):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if generate_fn is not None:
        args.generate_fn = generate_fn
    return args.func(args)


def test_cli_pope_build_and_questions(data, tmp_path, capsys):
    out = tmp_path / "built"
    argv = ["pope", "--build-from", str(data["instances"]), "--images", str(data["images"]), "--out", str(out)]
    assert _cli([*argv, "--n-images", "4", "--split", "popular", "--no-progress"], fake_answer) == 0
    res = load_results(out)
    assert list(res["splits"]) == ["popular"] and res["splits"]["popular"]["count"] == 24
    assert len(load_questions(out / "questions_popular.jsonl")) == 24
    assert "| popular |" in capsys.readouterr().out
    meta = res["metadata"]  # self-describing: versions, git hash, seed, device
    assert {"vlmfix", "transformers", "torch", "accelerate", "pycocotools"} <= set(meta["versions"])
    assert meta["seed"] == 0 and "git" in meta and "device" in meta
    report = (out / "report.md").read_text()
    assert "**versions**" in report and "**seed**" in report
    if meta["git"]:
        assert meta["git"] in report
    # the same questions through --questions and a preset give the same numbers
    qfile = write_questions(load_questions(out / "questions_popular.jsonl"), tmp_path / "coco_pope_popular.jsonl")
    out2 = tmp_path / "from_file"
    argv2 = ["pope", "--questions", str(qfile), "--images", str(data["images"]), "--out", str(out2)]
    assert _cli([*argv2, "--config", "pope_popular", "--no-progress"], fake_answer) == 0
    assert load_results(out2)["splits"] == res["splits"]
    assert load_results(out2)["generation"]["max_new_tokens"] == 16  # from the preset


def test_cli_pope_config_errors(data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("include: pope.yaml\ntemplte: plain\n")
    (tmp_path / "pope.yaml").write_text("task: pope\n")
    argv = ["pope", "--questions", "x.json", "--images", str(data["images"]), "--out", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match="did you mean 'template'"):
        _cli([*argv, "--config", str(bad)], fake_answer)
    with pytest.raises(ConfigError, match="not 'pope'"):
        _cli([*argv, "--config", "chair"], fake_answer)


def test_cli_chair_score_compare(data, tmp_path, capsys):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(
        "\n".join(json.dumps({"image_id": i, "caption": f"A dog, a cat and {i} cars."}) for i in range(1, 6))
    )
    outs = []
    for norm in ("lemma", "plural"):
        out = tmp_path / norm
        argv = ["chair", "--captions", str(caps), "--annotations", str(data["root"] / "gt.json"), "--out", str(out)]
        assert _cli([*argv, "--normalizer", norm, "--label", norm, "--no-progress"]) == 0
        outs.append(str(out))
    assert load_results(outs[0])["normalizer"] == "lemma"
    assert _cli(["compare", *outs, "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| lemma |" in table and "| plural |" in table
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000


def test_compare_refuses_mixed_tasks(data, tmp_path):
    run_pope(_pope_splits(data, 2), data["images"], tmp_path / "p", fake_answer)
    gt = load_ground_truth(data["root"] / "gt.json")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 1, "caption": "A dog."}))
    run_chair(caption_samples(caps, gt), gt, tmp_path / "c")
    with pytest.raises(DataError, match="different tasks"):
        compare_runs([tmp_path / "p", tmp_path / "c"], tmp_path / "cmp")


def test_cli_pope_scores_existing_answers(data, tmp_path):
    qs = build_questions(data["instances"], "random", n_images=3, seed=0)
    qfile = write_questions(qs, tmp_path / "coco_pope_random.jsonl")
    answers = tmp_path / "answers.jsonl"
    texts = ["Yes", "NO", "There is not.", "yes, one", "", "Not sure"] * 3
    answers.write_text(
        "\n".join(json.dumps({"question_id": q.question_id, "text": t}) for q, t in zip(qs, texts, strict=True))
    )
    out = tmp_path / "scored"
    argv = ["pope", "--questions", str(qfile), "--answers", str(answers), "--out", str(out), "--no-progress"]
    assert _cli(argv) == 0  # no model, no images
    res = load_results(out)
    preds = [r["pred"] for r in _records(out)]
    assert preds == ["yes", "yes", "no", "yes", "yes", "yes"] * 3  # the official rule's reading
    assert res["splits"]["random"]["yes_ratio"] == pytest.approx(15 / 18)
    out2 = tmp_path / "scored2"
    assert _cli([*argv[:-3], "--out", str(out2), "--parser", "yes_no_unknown", "--no-progress"]) == 0
    assert load_results(out2)["splits"]["random"]["unknown"] == 6
    answers.write_text(json.dumps({"question_id": qs[0].question_id, "text": "Yes"}))
    with pytest.raises(DataError, match="1 answers for 18 questions"):
        _cli([*argv[:-3], "--out", str(tmp_path / "bad")])


def test_results_carry_bootstrap_intervals_and_compare_pairs_runs(data, tmp_path):
    splits = _pope_splits(data, 5)
    res = run_pope(splits, data["images"], tmp_path / "p1", fake_answer)
    assert res["bootstrap"]["n_resamples"] == 1000 and res["bootstrap"]["seed"] == 0
    assert res["bootstrap"]["n_units"] == 5  # images, not questions
    for m in res["splits"].values():
        for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            lo, hi = m["ci"][name]
            assert lo <= m[name] <= hi
    assert res["mean_f1_ci"][0] <= res["mean_f1"] <= res["mean_f1_ci"][1]
    assert "[brackets]: 95% percentile bootstrap interval over 5 images" in (tmp_path / "p1" / "report.md").read_text()

    def always_yes(images, prompts):
        return ["Yes"] * len(prompts)

    run_pope(splits, data["images"], tmp_path / "p2", always_yes)
    compare_runs([tmp_path / "p1", tmp_path / "p2"], tmp_path / "cmp", bootstrap=BootstrapSpec(200, seed=3))
    cmp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    (pair,) = cmp["paired"]
    assert pair["n_shared_units"] == 5 and pair["bootstrap"]["n_resamples"] == 200
    # answering "yes" to everything: yes-ratio 100 %, far outside the interval
    assert pair["metrics"]["random/yes_ratio"]["b"] == 1.0 and pair["metrics"]["random/yes_ratio"]["outside"]
    assert "Differences from" in (tmp_path / "cmp" / "comparison.md").read_text()

    gt = load_ground_truth(data["root"] / "gt.json")
    caps = tmp_path / "caps.json"  # a JSON array is accepted
    caps.write_text(json.dumps([{"image_id": i, "caption": "A dog and a cat."} for i in range(1, 13)]))
    c1 = run_chair(caption_samples(caps, gt), gt, tmp_path / "c1")
    assert set(c1["metrics"]["ci"]) == {"CHAIR_s", "CHAIR_i", "Recall", "Len"} and c1["bootstrap"]["n_units"] == 12
    run_chair(caption_samples(caps, gt), gt, tmp_path / "c2")
    compare_runs([tmp_path / "c1", tmp_path / "c2"], tmp_path / "cmp2")
    same = json.loads((tmp_path / "cmp2" / "comparison.json").read_text())["paired"][0]["metrics"]
    assert all(d["diff"] == 0 and not d["outside"] for d in same.values())


def test_captions_file_repeated_image_is_an_error_or_deduped(data, tmp_path):
    gt = load_ground_truth(data["root"] / "gt.json")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"image_id": 1, "caption": "A dog."},
                {"image_id": 2, "caption": "A cat."},
                {"path": "COCO_val2014_000000000001.jpg", "caption": "A bus."},  # image 1 again
            ]
        )
    )
    with pytest.raises(DataError, match=r"caps\.jsonl:3: image 1 already has a caption on line 1.*--dedupe"):
        caption_samples(caps, gt)
    first = caption_samples(caps, gt, dedupe="first")
    last = caption_samples(caps, gt, dedupe="last")
    assert [s.text for s in first] == ["A dog.", "A cat."]
    assert [s.text for s in last] == ["A bus.", "A cat."]
    argv = ["chair", "--captions", str(caps), "--annotations", str(data["root"] / "gt.json"), "--no-progress"]
    with pytest.raises(DataError, match="already has a caption"):
        _cli([*argv, "--out", str(tmp_path / "r0")])
    assert _cli([*argv, "--out", str(tmp_path / "r1"), "--dedupe", "last"]) == 0
    assert load_results(tmp_path / "r1")["metrics"]["n_captions"] == 2
    arr = tmp_path / "arr.json"
    arr.write_text('[\n  {"image_id": 1, "caption": "A dog."},\n  {"image_id": 1, "caption": "x"}\n]')
    with pytest.raises(DataError, match=r"arr\.json:3: image 1 already has a caption on line 2"):
        caption_samples(arr, gt)
