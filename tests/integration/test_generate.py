"""vlmfix.generate: batching with left padding, cache, sampling, EOS, validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import PROMPTS, make_images, tiny

import vlmfix
from vlmfix.errors import ConfigError, DataError
from vlmfix.methods.base import Method, MethodConfig


def test_batch_with_left_padding_equals_per_sample(family):
    model, processor = tiny(family)
    imgs = make_images(4)
    batch = vlmfix.generate(model, processor, imgs, PROMPTS[:4], max_new_tokens=6, return_scores=True)
    lengths = set(batch.prompt_lengths)
    assert len(lengths) > 1, "prompts of different lengths are needed to exercise left padding"
    for i in range(4):
        single = vlmfix.generate(model, processor, [imgs[i]], [PROMPTS[i]], max_new_tokens=6, return_scores=True)
        assert single.token_ids[0] == batch.token_ids[i]
        torch.testing.assert_close(single.scores[0], batch.scores[i], atol=1e-4, rtol=1e-4)


def test_cache_on_equals_cache_off(family):
    model, processor = tiny(family)
    imgs = make_images(2)
    a = vlmfix.generate(model, processor, imgs, PROMPTS[:2], max_new_tokens=5, return_scores=True)
    b = vlmfix.generate(model, processor, imgs, PROMPTS[:2], max_new_tokens=5, return_scores=True, use_cache=False)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_deterministic_and_seed_matters():
    model, processor = tiny("llava_next")
    imgs = make_images(3)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    a = vlmfix.generate(model, processor, imgs, PROMPTS[:3], seed=1, **kw)
    b = vlmfix.generate(model, processor, imgs, PROMPTS[:3], seed=1, **kw)
    c = vlmfix.generate(model, processor, imgs, PROMPTS[:3], seed=2, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_sampling_is_greedy():
    model, processor = tiny("llava")
    imgs = make_images(2)
    greedy = vlmfix.generate(model, processor, imgs, PROMPTS[:2], max_new_tokens=5)
    sampled = vlmfix.generate(model, processor, imgs, PROMPTS[:2], max_new_tokens=5, do_sample=True, top_k=1, seed=9)
    assert greedy.token_ids == sampled.token_ids


@dataclass(frozen=True)
class _ForceEos(MethodConfig):
    """Test-only method: forces EOS for sample 0 at a given step."""

    name: ClassVar[str] = "_force_eos"
    step: int = 2
    eos: int = 2

    def build(self):
        cfg = self

        class _M(Method):
            def process_logits(self, step, logits):
                if step == cfg.step:
                    logits = logits.clone()
                    logits[0] = float("-inf")
                    logits[0, cfg.eos] = 0.0
                return logits

        return _M(self)


def test_stops_on_eos_per_sample():
    model, processor = tiny("llava")
    imgs = make_images(2)
    out = vlmfix.generate(model, processor, imgs, PROMPTS[:2], methods=[_ForceEos()], max_new_tokens=6)
    assert out.token_ids[0][-1] == 2 and len(out.token_ids[0]) == 3
    assert len(out.token_ids[1]) == 6
    assert "</s>" not in out.texts[0]


def test_input_validation():
    model, processor = tiny("llava")
    imgs = make_images(2)
    with pytest.raises(DataError, match="2 images but 1 prompts"):
        vlmfix.generate(model, processor, imgs, PROMPTS[:1])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        vlmfix.generate(model, processor, imgs[:1], PROMPTS[:1], max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        vlmfix.generate(model, processor, imgs[:1], PROMPTS[:1], top_p=0.0)
    with pytest.raises(DataError, match="does not exist"):
        vlmfix.generate(model, processor, ["/no/such/image.png"], PROMPTS[:1])


def test_stats_keyed_by_method():
    model, processor = tiny("llava")
    out = vlmfix.generate(
        model, processor, make_images(1), PROMPTS[:1], methods=[vlmfix.methods.get("baseline")()], max_new_tokens=2
    )
    assert out.stats == {"baseline": {}}


def test_stats_values_count_what_the_methods_did():
    """Telemetry values, not just keys: PAI edits one row per (sample, head, layer, step);
    VAR with an unreachable tau finds no sink, changes no row and says so."""
    model, processor = tiny("llava")
    n_heads = model.config.text_config.num_attention_heads
    out = vlmfix.generate(
        model,
        processor,
        make_images(2),
        PROMPTS[:2],
        methods=[vlmfix.PAI(), vlmfix.VAR(tau=1000.0)],
        max_new_tokens=3,
    )
    pai, var = out.stats["pai"], out.stats["var"]
    steps = max(len(ids) for ids in out.token_ids)
    assert pai["layers"] and pai["rows_touched"] == 2 * n_heads * len(pai["layers"]) * steps
    assert var["sinks_per_layer"] and set(var["sinks_per_layer"].values()) == {0}
    assert var["rows_considered"] > 0 and var["rows_redistributed"] == 0
    assert var["rows_redistributed_fraction"] == 0.0 and "tau=1000.0" in var["no_effect"]
    out = vlmfix.generate(model, processor, make_images(2), PROMPTS[:2], methods=[vlmfix.VAR(tau=2.0)], max_new_tokens=1)
    assert "no_effect" not in out.stats["var"] and sum(out.stats["var"]["sinks_per_layer"].values()) > 0
