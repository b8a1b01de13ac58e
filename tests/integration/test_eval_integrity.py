"""`vlmfix eval`: the run folder is locked, error records are retried, inputs are checked
before the model loads, a partial or all-failed run says so, results are honest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import test_eval_pipeline as pipeline
from PIL import Image

from vlmfix.cli import main
from vlmfix.errors import DataError, StateError
from vlmfix.eval.chair import image_id_from_path, load_ground_truth
from vlmfix.eval.pope import build_questions, load_questions, write_questions
from vlmfix.eval.report import load_results

data = pipeline.data  # the fixture: 12 tiny COCO-named images, instances, gt.json
_cli, _records, fake_answer = pipeline._cli, pipeline._records, pipeline.fake_answer


@pytest.fixture
def no_model(monkeypatch):
    import vlmfix.loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before a user error was reported")

    monkeypatch.setattr(vlmfix.loading, "load", refuse)


def _questions(data, tmp_path, n_images=2):
    qs = build_questions(data["instances"], "random", n_images=n_images, seed=0)
    return write_questions(qs, tmp_path / "coco_pope_random.jsonl"), qs


def _pope(data, qfile, out, *extra):
    return ["pope", "--questions", str(qfile), "--images", str(data["images"]), "--out", str(out), *extra]


def test_second_run_on_a_run_folder_is_refused_with_the_pid(data, tmp_path, capsys, no_model):
    qfile, _ = _questions(data, tmp_path)
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom vlmfix.io import OutputLock\n"
            "OutputLock(sys.argv[1], folder=True).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateError, match=f"in use by PID {holder.pid}"):
            _cli(_pope(data, qfile, out, "--no-progress"), fake_answer)
        # through the real command line: refused before the model loads, no traceback
        assert main(["eval", *_pope(data, qfile, out, "--no-progress", "--model", "tiny-random")]) == 2
        assert f"in use by PID {holder.pid}" in capsys.readouterr().err
        assert not (out / "samples.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _cli(_pope(data, qfile, out, "--no-progress"), fake_answer) == 0


def test_error_records_are_retried_and_replaced(data, tmp_path):
    qfile, qs = _questions(data, tmp_path)
    victim = data["images"] / qs[0].image
    saved = victim.read_bytes()
    victim.unlink()
    out = tmp_path / "run"
    assert _cli(_pope(data, qfile, out, "--no-progress"), fake_answer) == 0
    assert load_results(out)["n_errors"] == 6
    victim.write_bytes(saved)  # the folder is fixed
    assert _cli(_pope(data, qfile, out, "--no-progress", "--keep-errors"), fake_answer) == 0
    assert load_results(out)["n_errors"] == 6  # kept as final on request
    assert _cli(_pope(data, qfile, out, "--no-progress", "--resume"), fake_answer) == 0
    res, recs = load_results(out), _records(out)
    assert res["n_errors"] == 0 and res["complete"] is True
    assert len(recs) == len({r["key"] for r in recs}) == 12 and not any("error" in r for r in recs)


def test_wrong_images_folder_is_refused_before_the_model_loads(data, tmp_path, no_model):
    qfile, _ = _questions(data, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["pope", "--questions", str(qfile), "--out", str(tmp_path / "run"), "--model", "tiny-random"]
    with pytest.raises(DataError, match="none of the 2 images the questions name is in"):
        _cli([*argv, "--images", str(empty)])
    with pytest.raises(DataError, match="is not a folder"):
        _cli([*argv, "--images", str(tmp_path / "nope")])
    assert not (tmp_path / "run" / "samples.jsonl").exists()


def test_every_sample_failing_exits_nonzero(data, tmp_path, capsys):
    qfile, qs = _questions(data, tmp_path)
    for q in qs:
        (data["images"] / q.image).write_bytes(b"not an image")
    assert _cli(_pope(data, qfile, tmp_path / "run", "--no-progress"), fake_answer) == 1
    assert "every sample failed" in capsys.readouterr().err


def test_limited_run_is_not_complete(data, tmp_path):
    qfile, _ = _questions(data, tmp_path)
    out = tmp_path / "run"
    assert _cli(_pope(data, qfile, out, "--no-progress", "--limit", "4"), fake_answer) == 0
    res = load_results(out)
    assert res["n_samples"] == 4 and res["n_errors"] == 0
    assert res["complete"] is False and res["limit"] == 4 and res["limited"] is True
    assert res["images"] == str(data["images"])
    out2 = tmp_path / "run2"  # a limit above the question count leaves nothing out
    assert _cli(_pope(data, qfile, out2, "--no-progress", "--limit", "100"), fake_answer) == 0
    assert load_results(out2)["complete"] is True
    chair = ["chair", "--images", str(data["images"]), "--annotations", str(data["instances"]), "--no-progress"]

    def caption(images, prompts):
        return ["A dog and a cat."] * len(prompts)

    assert _cli([*chair, "--out", str(tmp_path / "c"), "--limit", "3"], caption) == 0
    res = load_results(tmp_path / "c")
    assert res["n_samples"] == 3 and res["complete"] is False and res["limit"] == 3
    assert res["images"]["dir"] == str(data["images"])


@pytest.mark.parametrize(
    "argv",
    [
        ["pope", "--questions", "q.json", "--images", ".", "--out", "o", "--limit", "-3"],
        ["pope", "--build-from", "a.json", "--images", ".", "--out", "o", "--n-images", "-1"],
        ["chair", "--images", ".", "--annotations", "a", "--out", "o", "--n", "-5"],
        ["chair", "--images", ".", "--annotations", "a", "--out", "o", "--limit", "0"],
    ],
    ids=["pope-limit", "pope-n-images", "chair-n", "chair-limit"],
)
def test_negative_counts_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", *argv])
    assert exc.value.code == 2 and "must be a whole number >= 1" in capsys.readouterr().err


def test_interrupt_message_names_the_way_to_continue(data, tmp_path, capsys, monkeypatch):
    import vlmfix.eval.cli as eval_cli

    qfile, _ = _questions(data, tmp_path)

    def interrupted(images, prompts):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "_model", lambda args: (interrupted, {"model_id": "x", "methods": []}))
    assert main(["eval", *_pope(data, qfile, tmp_path / "run", "--no-progress")]) == 130
    err = capsys.readouterr().err
    assert "Re-run the same command" in err
    # ... and what it says works: the flag is accepted
    monkeypatch.setattr(eval_cli, "_model", lambda args: (fake_answer, {"model_id": "x", "methods": []}))
    assert main(["eval", *_pope(data, qfile, tmp_path / "run", "--no-progress", "--resume")]) == 0


def test_results_state_the_resolved_model_dtype_generation_and_telemetry(data, tmp_path):
    qfile, _ = _questions(data, tmp_path, n_images=1)
    out = tmp_path / "run"
    argv = _pope(data, qfile, out, "--no-progress", "--model", "tiny-random", "--method", "var")
    assert main(["eval", *argv, "--max-new-tokens", "2", "--batch-size", "6"]) == 0
    res = load_results(out)
    assert res["model_id"] == "tiny-random" and res["model_resolved"] == "tiny-random:llava"
    assert res["dtype"] == "float32"
    assert set(res["generation"]) >= {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed"}
    var = res["method_stats"]["methods"]["var"]
    assert res["method_stats"]["batches"] == 1 and var["sums"]["rows_redistributed"] == 0
    assert var["last_batch"]["sinks_per_layer"] == {"2": 0}
    assert any("0 sink tokens" in w for w in res["method_stats"]["method_warnings"])
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_resolved"] == "tiny-random:llava" and config["dtype"] == "float32"


def test_chair_images_only_coco_style_names_are_ids(data, tmp_path, no_model):
    assert image_id_from_path("val2014/COCO_val2014_000000000009.jpg") == 9
    assert image_id_from_path("000000000009.jpg") == 9
    for name in ("IMG_0009.jpg", "holiday9.png", "COCO_val2014_9x.jpg"):
        with pytest.raises(DataError, match="not a COCO-style name"):
            image_id_from_path(name)
    folder = tmp_path / "phone"
    folder.mkdir()
    for i in (1, 2, 9):
        Image.new("RGB", (4, 4)).save(folder / f"IMG_000{i}.jpg")
    gt_json = data["root"] / "gt.json"
    argv = ["chair", "--images", str(folder), "--annotations", str(gt_json), "--out", str(tmp_path / "c")]
    with pytest.raises(DataError, match="none of the 3 chosen images"):
        _cli([*argv, "--model", "tiny-random"])
    # an explicit mapping (annotations with file_name) is honoured
    gt = load_ground_truth(data["instances"])
    assert gt.resolve(path="COCO_val2014_000000000003.jpg") == 3


def test_question_files_with_a_bom_load_and_latin1_is_a_clear_error(data, tmp_path):
    qfile, qs = _questions(data, tmp_path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + qfile.read_bytes())
    assert [q.question_id for q in load_questions(bom)] == [q.question_id for q in qs]
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(
        qfile.read_bytes().replace(b'"text": "Is', '"text": "Caf\u00e9 \u2014 is'.encode("utf-8")).replace(
            "\u00e9".encode(), b"\xe9"
        )
    )
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not UTF-8 text .*re-save the file as UTF-8"):
        load_questions(latin)
    # answers / captions files (JSON lines) accept a BOM too
    caps = tmp_path / "caps.jsonl"
    caps.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image_id": 1, "caption": "A dog."}).encode() + b"\n")
    out = tmp_path / "c"
    argv = ["chair", "--captions", str(caps), "--annotations", str(data["root"] / "gt.json"), "--out", str(out)]
    assert _cli([*argv, "--no-progress"]) == 0


def test_out_that_is_a_file_is_refused(data, tmp_path):
    qfile, _ = _questions(data, tmp_path)
    (tmp_path / "taken").write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        _cli(_pope(data, qfile, tmp_path / "taken", "--no-progress"), fake_answer)


def test_results_script_rejects_small_n_without_a_traceback(capsys):
    from vlmfix.testbed.results import main as results_main

    with pytest.raises(SystemExit) as exc:
        results_main(["--n", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--n 2 must be >= 3" in err and "Traceback" not in err


def test_results_script_writes_a_run_folder_not_the_docs(tmp_path, monkeypatch):
    """Regenerating docs/results.md is an explicit option; the default is a run folder."""
    import vlmfix.testbed.results as results

    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("# docs\n")
    row = {"variant": "clean", "method": "baseline"}
    row.update(dict.fromkeys(("pope_random_acc", "pope_random_f1", "pope_adversarial_acc", "pope_adversarial_f1"), 0.5))
    for k in ("chair_s_natural", "chair_i_natural", "chair_s_adversarial", "chair_i_adversarial"):
        row[k] = 0.1
    row.update(recall_adversarial=0.9, partner_rate=0.2, partner_after_a=0.5, partner_before_a=0.3)
    row.update(partner_a_unnamed=0.2)
    monkeypatch.setattr(results, "evaluate", lambda variant, methods, *a, **k: [dict(row, variant=variant)])
    monkeypatch.setattr(results, "_write_splits", lambda *a: {})
    assert results.main(["--variants", "clean", "--methods", "baseline", "--n", "3"]) == 0
    assert (tmp_path / "runs" / "testbed-results" / "results.md").read_text().count("| clean | baseline |") == 1
    assert (tmp_path / "runs" / "testbed-results" / "rows.json").is_file()
    assert (tmp_path / "docs" / "results.md").read_text() == "# docs\n"  # untouched
    assert results.main(["--variants", "clean", "--methods", "baseline", "--n", "3", "--update-docs"]) == 0
    assert "| clean | baseline |" in (tmp_path / "docs" / "results.md").read_text()
    assert (tmp_path / "docs" / "results" / "rows.json").is_file()
