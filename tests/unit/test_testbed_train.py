"""Training data format and the CPU smoke run of the testbed trainer."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from vlmfix.errors import ConfigError
from vlmfix.testbed import catalog as cat
from vlmfix.testbed import scenes
from vlmfix.testbed.processing import VOCAB, build_processor, prompt_text
from vlmfix.testbed.train import PromptTable, TrainConfig, caption_answers, make_batch

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def table(processor):
    return PromptTable(processor)


def test_caption_answers_spell_the_canonical_caption(processor):
    batch = scenes.sample(3, range(64), variant="caption_noise")
    ids, lengths = caption_answers(batch.mentioned)
    for i in range(len(batch)):
        row = ids[i, : lengths[i]].tolist()
        assert row[-1] == VOCAB["</s>"]
        text = processor.tokenizer.decode(row, skip_special_tokens=True)
        assert text == scenes.caption_text(batch.mentioned[i])


@pytest.mark.parametrize("variant", cat.VARIANTS)
def test_training_sequences_are_chat_template_plus_answer_plus_eos(processor, table, variant):
    """Each sequence equals the processor's tokenization of template + answer + </s>."""
    cfg = TrainConfig(variant=variant, seed=5)
    batch = scenes.sample(cfg.seed, range(40), variant=variant)
    tb = make_batch(batch, table, cfg)
    images = scenes.to_pil(scenes.render(batch))
    n_caption = n_yes = n_no = 0
    for i in range(len(batch)):
        ids = tb.input_ids[i]
        answer_pos = (tb.targets[i] != -100).nonzero().flatten()
        answer = processor.tokenizer.decode(ids[answer_pos[:-1]].tolist())
        prompt = table.texts[int(tb.prompt_rows[i])]
        text = prompt_text(processor, prompt) + " " + answer + "</s>"
        ref = processor(text=[text], images=[images[i]], return_tensors="pt")["input_ids"][0]
        n = len(ref)
        assert ids[:n].tolist() == ref.tolist(), (prompt, answer)
        assert (ids[n:] == VOCAB["<pad>"]).all()
        assert answer_pos.tolist() == list(range(n - len(answer_pos), n))  # answer + eos, then pads
        # the answer is the scene's truth under the variant's labels
        if prompt in cat.CAPTION_PROMPTS:
            n_caption += 1
            assert answer == scenes.caption_text(batch.mentioned[i])
        else:
            name = next(c for c in cat.CATEGORY_NAMES if f" a {c} " in f" {prompt} ")
            present = bool(batch.labelled[i, cat.category_index(name)])
            assert answer == ("yes" if present else "no")
            n_yes += answer == "yes"
            n_no += answer == "no"
    assert n_caption > 5 and n_yes > 3 and n_no > 3
    assert torch.equal(
        tb.pixel_values, processor(text=["<image>"] * len(images), images=images, return_tensors="pt")["pixel_values"]
    )


def test_train_config_validation():
    with pytest.raises(ConfigError, match="variant"):
        TrainConfig(variant="noisy")
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="strength"):
        TrainConfig(strength=1.5)


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory):
    from vlmfix.testbed.train import main

    out = tmp_path_factory.mktemp("smoke") / "model"
    assert main(["--smoke", "--variant", "occlusion_prior", "--out", str(out)]) == 0
    return out


def test_smoke_training_saves_a_loadable_hf_folder(smoke_folder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(smoke_folder)
    assert model.dtype == torch.float16
    processor = AutoProcessor.from_pretrained(smoke_folder)
    assert processor.patch_size == cat.PATCH_SIZE
    meta = json.loads((smoke_folder / "testbed.json").read_text())
    assert meta["variant"] == "occlusion_prior" and meta["steps_done"] == meta["config"]["steps"]
    rows = list(csv.DictReader(open(smoke_folder / "train_log.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # it learns
    model = model.float()
    s = scenes.make_scene(1, 0)
    enc = processor(text=[prompt_text(processor, "describe the image.")], images=[s.image], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
