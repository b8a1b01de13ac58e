"""The testbed model: a small HF ``LlavaForConditionalGeneration`` built from configs.

CLIP vision tower (hidden 256, 4 layers, patch 8 on 64x64 -> 64 patches + CLS; the
"default" select strategy drops CLS) -> 2-layer GELU projector -> Llama LM (hidden 256,
4 layers, 4 query heads sharing 2 key/value heads, i.e. GQA as in LLaVA-OneVision's
LMs). About 4.0M parameters, 8 MB in fp16, so three variants fit in the package.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmfix.testbed import catalog as cat
from vlmfix.testbed.processing import VOCAB

__all__ = ["ARCH", "build_config", "build_model", "count_parameters"]

# Architecture knobs (one place). vocab is padded to a multiple of 8 for tensor cores.
ARCH: dict[str, Any] = {
    "vision_hidden": 256,
    "vision_layers": 4,
    "vision_heads": 4,
    "vision_mlp": 384,
    "text_hidden": 256,
    "text_layers": 4,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_mlp": 384,
    "vocab_size": -(-len(VOCAB) // 8) * 8,
    "max_positions": 256,
}


def build_config():
    """The ``LlavaConfig`` of the testbed model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=ARCH["vision_hidden"],
        intermediate_size=ARCH["vision_mlp"],
        num_hidden_layers=ARCH["vision_layers"],
        num_attention_heads=ARCH["vision_heads"],
        image_size=cat.IMAGE_SIZE,
        patch_size=cat.PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
        projection_dim=ARCH["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=ARCH["vocab_size"],
        hidden_size=ARCH["text_hidden"],
        intermediate_size=ARCH["text_mlp"],
        num_hidden_layers=ARCH["text_layers"],
        num_attention_heads=ARCH["text_heads"],
        num_key_value_heads=ARCH["text_kv_heads"],
        max_position_embeddings=ARCH["max_positions"],
        rms_norm_eps=1e-5,
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
        pad_token_id=VOCAB["<pad>"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB["<image>"],
        image_seq_length=(cat.IMAGE_SIZE // cat.PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return config


def build_model(seed: int = 0):
    """A freshly initialised testbed ``LlavaForConditionalGeneration`` (float32, sdpa).

    Args:
        seed: initialisation seed; the global torch RNG is restored afterwards.
    """
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    config = build_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")  # both towers; what from_pretrained also picks
    model.generation_config = GenerationConfig(
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
        pad_token_id=VOCAB["<pad>"],
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (each tensor counted once)."""
    return sum(p.numel() for p in model.parameters())
