"""End to end: `vlmfix eval pope|chair --model testbed...` on generated held-out scenes
shows the designed hallucinations (adversarial worse than random / natural)."""

from __future__ import annotations

import json

import pytest

from vlmfix.cli import main

SEED = 1_000_003  # never used in training


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    from vlmfix.eval.pope import build_questions, load_coco_objects, write_questions
    from vlmfix.testbed import scenes

    root = tmp_path_factory.mktemp("scenes")
    out = {kind: scenes.write_split(root / kind, n=48, seed=SEED, kind=kind) for kind in ("natural", "adversarial")}
    natural = load_coco_objects(out["natural"]["instances"])
    adversarial = load_coco_objects(out["adversarial"]["instances"])
    adversarial.cooccur = natural.cooccur  # adversarial negatives follow the world's priors
    write_questions(build_questions(natural, "random", n_images=48, seed=0), root / "pope_random.jsonl")
    write_questions(build_questions(adversarial, "adversarial", n_images=48, seed=0), root / "pope_adversarial.jsonl")
    return root, out


def _pope(root, images, split, model, out):
    argv = ["eval", "pope", "--model", model, "--questions", str(root / f"pope_{split}.jsonl"), "--split", split,
            "--images", str(images), "--template", "plain", "--max-new-tokens", "4", "--batch-size", "64",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())["splits"][split]


def _chair(images, instances, model, out):
    argv = ["eval", "chair", "--model", model, "--images", str(images), "--annotations", str(instances),
            "--n", "48", "--prompt", "describe the image.", "--max-new-tokens", "24", "--batch-size", "64",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())["metrics"]


def test_occlusion_prior_pope_adversarial_is_worse_than_random(splits, tmp_path):
    root, out = splits
    model = "testbed:occlusion_prior"
    rand = _pope(root, out["natural"]["images"], "random", model, tmp_path / "r")
    adv = _pope(root, out["adversarial"]["images"], "adversarial", model, tmp_path / "a")
    assert rand["accuracy"] >= 0.9
    assert adv["accuracy"] <= rand["accuracy"] - 0.1
    assert adv["yes_ratio"] > rand["yes_ratio"]  # the failure mode is saying "yes" to the absent partner


def test_caption_noise_hallucinates_partners_in_captions(splits, tmp_path):
    root, out = splits
    nat = _chair(out["natural"]["images"], out["natural"]["instances"], "testbed", tmp_path / "n")
    adv = _chair(out["adversarial"]["images"], out["adversarial"]["instances"], "testbed", tmp_path / "a")
    assert nat["Recall"] >= 0.9
    assert adv["CHAIR_i"] > nat["CHAIR_i"] + 0.1
    assert adv["CHAIR_s"] >= 0.5
