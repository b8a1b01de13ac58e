"""The models ``vlmfix bench`` builds: full-size LLaVA-1.5-7B and LLaVA-NeXT-7B from their
configs with random weights (compute does not depend on weight values, so nothing is
downloaded), and the tiny test model for CPU dry runs; plus the random inputs.

The benchmark scripts in ``benchmarks/`` build their models here too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ModelSpec",
    "MODELS",
    "instantiate",
    "build_llava_7b",
    "build_llava_next_7b",
    "build_model",
    "make_batch",
]

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def instantiate(model_cls, config, device, dtype=None):
    """Build ``model_cls(config)`` with sdpa, directly in ``dtype`` (default fp16) on ``device``.

    No full-precision copy is made first, so a 7B model needs only its own bytes.
    """
    import torch

    dtype = torch.float16 if dtype is None else dtype
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def build_llava_7b(device, dtype=None):
    """Random LLaVA-1.5-7B (CLIP ViT-L/14-336 + Llama-2-7B, vocab 32064; sdpa, fp16 by default)
    with vlmfix's word-level test tokenizer and a 336px CLIP processor.

    Returns:
        ``(model, processor)``; ``device="meta"`` gives the configs without weights.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vlmfix.testing import LLAVA15_CHAT_TEMPLATE, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = instantiate(LlavaForConditionalGeneration, config, device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": 336},
                crop_size={"height": 336, "width": 336},
                image_mean=CLIP_MEAN,
                image_std=CLIP_STD,
            ),
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA15_CHAT_TEMPLATE,  # LLaVA-1.5's conversation format
        )
    model.generation_config.pad_token_id = 0
    return model, processor


def build_llava_next_7b(device, dtype=None):
    """Random LLaVA-NeXT-7B (Vicuna-7B LM, CLIP ViT-L/14-336, any-res grids up to 672px;
    sdpa, fp16 by default) with vlmfix's word-level test tokenizer.

    Returns:
        ``(model, processor)``.
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from vlmfix.testing import LLAVA15_CHAT_TEMPLATE, build_tiny_tokenizer

    base, _ = build_llava_7b("meta")  # the 7B vision/text configs, no weights allocated
    tokenizer = build_tiny_tokenizer()
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    config = LlavaNextConfig(
        vision_config=base.config.vision_config,
        text_config=base.config.text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = instantiate(LlavaNextForConditionalGeneration, config, device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(
                size={"shortest_edge": 336},
                crop_size={"height": 336, "width": 336},
                image_grid_pinpoints=pinpoints,
                image_mean=CLIP_MEAN,
                image_std=CLIP_STD,
            ),
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA15_CHAT_TEMPLATE,
        )
    model.generation_config.pad_token_id = 0
    return model, processor


def _build_tiny(device, dtype=None):
    from vlmfix.testing import build_tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, processor = build_tiny("llava", **({} if dtype is None else {"dtype": dtype}))
    return model.to(device), processor


@dataclass(frozen=True)
class ModelSpec:
    """A model :func:`build_model` can build: builder, default image side, whether it is 7B."""

    build: Callable
    image_size: int
    full_size: bool
    description: str


#: Models a suite can name. Full-size ones need CUDA.
MODELS: dict[str, ModelSpec] = {
    "llava-1.5-7b": ModelSpec(
        build_llava_7b, 336, True, "random LLaVA-1.5-7B (CLIP ViT-L/14-336 + Llama-2-7B; 576 image tokens)"
    ),
    # 500px images: a 2x2 any-res crop grid plus the base grid (~2950 prompt tokens).
    "llava-next-7b": ModelSpec(
        build_llava_next_7b, 500, True, "random LLaVA-NeXT-7B (any-res, 500px images: ~2950 prompt tokens)"
    ),
    "tiny": ModelSpec(_build_tiny, 32, False, "tiny random LLaVA-1.5 layout (vlmfix.testing.build_tiny)"),
}


def build_model(name: str, device, dtype):
    """``(model, processor)`` for a :data:`MODELS` name, random weights, on ``device``."""
    return MODELS[name].build(device, dtype)


def make_batch(n: int, size: int, seed: int = 0, words: tuple[int, int] = (6, 23)):
    """``n`` random ``size``x``size`` images and prompts of ``words[0]`` to ``words[1]`` words
    (different lengths, so the batch is left-padded)."""
    import numpy as np
    from PIL import Image

    from vlmfix.testing import build_tiny_tokenizer

    rng = np.random.default_rng(seed)
    vocab = sorted(w for w in build_tiny_tokenizer().get_vocab() if w.isalpha() and w.islower())
    images = [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]
    prompts = [" ".join(rng.choice(vocab, size=int(rng.integers(words[0], words[1] + 1)))) for _ in range(n)]
    return images, prompts
