"""The testbed model: a small HF ``LlavaForConditionalGeneration`` built from configs.

CLIP vision tower (hidden 256, 4 layers, patch 8 on 64x64 -> 64 patches + CLS; the
"default" select strategy drops CLS) -> 2-layer GELU projector -> Llama LM (hidden 256,
4 layers, 4 query heads sharing 2 key/value heads, i.e. GQA as in LLaVA-OneVision's
LMs). About 4.0M parameters, 8 MB in fp16, so three variants fit in the package.

Testbed v2 (issue 17): ``attention_sink`` uses a wider, deeper LM (:data:`VARIANT_ARCH`).
VAR's sink rule ``|RMSNorm(x)[d]| > tau`` is bounded by ``sqrt(hidden)``, so the paper's
``tau = 20`` can never fire on a 256-wide LM (bound 16); hidden 512 (bound 22.6) is the
smallest power-of-two width where it can, i.e. where one dim holds >= 78% of a token's
squared norm, as massive activations do. Five LM layers let VAR edit layers 2..3. The
vision tower is cut to 2 layers to save space (perception is not the point there).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmfix.testbed import catalog as cat
from vlmfix.testbed.processing import VOCAB

__all__ = ["ARCH", "VARIANT_ARCH", "arch_for", "build_config", "build_model", "count_parameters"]

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

# Per-variant overrides of ARCH (testbed v2). Every other variant uses ARCH as is.
VARIANT_ARCH: dict[str, dict[str, Any]] = {
    # 8.7M parameters, 17.3 MB in fp16: LM hidden 512 (8 query heads of 64, 2 KV heads),
    # 5 layers, MLP 512; vision tower 2 layers.
    "attention_sink": {
        "text_hidden": 512,
        "text_layers": 5,
        "text_heads": 8,
        "text_kv_heads": 2,
        "text_mlp": 512,
        "vision_layers": 2,
    },
}


def arch_for(variant: str | None = None) -> dict[str, Any]:
    """The architecture knobs of a variant: :data:`ARCH` updated by :data:`VARIANT_ARCH`."""
    return {**ARCH, **VARIANT_ARCH.get(variant or "", {})}


def build_config(arch: dict[str, Any] | None = None):
    """The ``LlavaConfig`` of the testbed model (``arch``: knobs, default :data:`ARCH`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    knobs = arch or ARCH
    vision = CLIPVisionConfig(
        hidden_size=knobs["vision_hidden"],
        intermediate_size=knobs["vision_mlp"],
        num_hidden_layers=knobs["vision_layers"],
        num_attention_heads=knobs["vision_heads"],
        image_size=cat.IMAGE_SIZE,
        patch_size=cat.PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
        projection_dim=knobs["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=knobs["vocab_size"],
        hidden_size=knobs["text_hidden"],
        intermediate_size=knobs["text_mlp"],
        num_hidden_layers=knobs["text_layers"],
        num_attention_heads=knobs["text_heads"],
        num_key_value_heads=knobs["text_kv_heads"],
        max_position_embeddings=knobs["max_positions"],
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


def build_model(seed: int = 0, arch: dict[str, Any] | None = None):
    """A freshly initialised testbed ``LlavaForConditionalGeneration`` (float32, sdpa).

    Args:
        seed: initialisation seed; the global torch RNG is restored afterwards.
        arch: architecture knobs (default :data:`ARCH`; a variant's: :func:`arch_for`).
    """
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    config = build_config(arch)
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
