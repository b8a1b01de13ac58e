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
from vlmfix.testbed.processing import VOCAB, build_processor, normalize, prompt_text
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


def test_two_stage_config_validation():
    with pytest.raises(ConfigError, match="blind_steps"):
        TrainConfig(steps=10, blind_steps=10)
    with pytest.raises(ConfigError, match="finetune_lr"):
        TrainConfig(steps=10, finetune_lr=1e-3)  # needs a blind stage to follow
    with pytest.raises(ConfigError, match="save_at"):
        TrainConfig(steps=10, save_at=(10,))
    TrainConfig(steps=10, blind_steps=4, finetune_lr=1e-3, save_at=(4, 9))


def test_lr_schedule_of_two_stages():
    from vlmfix.testbed.train import _lr_at

    one = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    two = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, blind_steps=40, finetune_lr=2e-4,
                      finetune_warmup=5)  # fmt: skip
    assert _lr_at(99, one) == pytest.approx(1e-4, rel=0.05)  # one cosine down to min at the end
    assert _lr_at(39, two) == pytest.approx(1e-4, rel=0.05)  # the first stage's cosine ends at blind_steps
    assert [_lr_at(k, two) for k in (40, 44)] == pytest.approx([2e-4 / 5, 2e-4])  # warmup, then constant
    assert _lr_at(99, two) == _lr_at(44, two)
    # a run of the same recipe with fewer steps has the same schedule up to its end
    shorter = TrainConfig(**{**two.__dict__, "steps": 60})
    assert [_lr_at(k, shorter) for k in range(60)] == [_lr_at(k, two) for k in range(60)]


def test_blind_batches_show_empty_backgrounds_and_prompt_loss_scores_the_prompt(table):
    b = scenes.sample(0, range(16))
    cfg = TrainConfig()
    seen, blind = make_batch(b, table, cfg), make_batch(b, table, cfg, blind=True)
    assert torch.equal(seen.input_ids, blind.input_ids) and torch.equal(seen.targets, blind.targets)
    flat = blind.pixel_values.flatten(2)
    assert torch.equal(flat.amax(2), flat.amin(2))  # one grey level per channel: no glyph drawn
    bg = normalize(b.bg.to(torch.uint8)[:, None, None, None].expand(-1, 1, 1, 3)).flatten(1)
    assert torch.allclose(flat[:, :, 0], bg)  # the scene's own background level
    assert not torch.equal(seen.pixel_values, blind.pixel_values)
    scored = make_batch(b, table, TrainConfig(prompt_loss=True), blind=True).targets
    ids = seen.input_ids
    in_prompt = (seen.targets == -100) & (ids != VOCAB["<pad>"])
    assert torch.equal(scored[~in_prompt], seen.targets[~in_prompt])  # answers scored as before
    text = in_prompt & (ids != VOCAB["<image>"])
    assert torch.equal(scored[text], ids[text]) and (scored[ids == VOCAB["<image>"]] == -100).all()


def test_a_snapshot_is_the_model_of_the_shorter_run(tmp_path):
    from safetensors.torch import load_file

    from vlmfix.testbed.train import train

    kw = {"batch_size": 4, "warmup_steps": 2, "blind_steps": 2, "finetune_lr": 1e-3, "finetune_warmup": 2,
          "chunk_steps": 2, "device": "cpu", "log_every": 1}  # fmt: skip
    train(TrainConfig(steps=5, save_at=(3,), **kw), tmp_path / "long")
    train(TrainConfig(steps=3, **kw), tmp_path / "short")
    snap = load_file(tmp_path / "long" / "step-3" / "model.safetensors")
    short = load_file(tmp_path / "short" / "model.safetensors")
    assert snap.keys() == short.keys() and all(torch.equal(snap[k], short[k]) for k in snap)
    meta = json.loads((tmp_path / "long" / "step-3" / "testbed.json").read_text())
    assert meta["steps_done"] == 3 and meta["config"]["steps"] == 5
    final = load_file(tmp_path / "long" / "model.safetensors")
    assert any(not torch.equal(final[k], snap[k]) for k in snap)


def test_weights_beyond_fp16_are_saved_in_fp32_not_as_inf(tmp_path, processor, caplog):
    from safetensors.torch import load_file

    from vlmfix.testbed.modeling import build_model
    from vlmfix.testbed.train import _save

    model = build_model(0)
    assert _save(model, processor, tmp_path / "ok", []) == "float16"
    model = build_model(0)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[1, 3] = 1e5  # the BOS row, past fp16's 65504
    assert _save(model, processor, tmp_path / "big", []) == "float32"
    assert "beyond fp16" in caplog.text and "embed_tokens" in caplog.text
    w = load_file(tmp_path / "big" / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in w.values())
