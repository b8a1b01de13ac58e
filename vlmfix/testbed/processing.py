"""The testbed's tokenizer, image processor and chat template, as a HF ``LlavaProcessor``.

- Tokenizer: a ``tokenizers`` WordLevel model over the catalogue's words (lower-cased
  input, punctuation split off, ``<image>`` as a special token), wrapped as a
  ``PreTrainedTokenizerFast`` that prepends ``<s>`` and pads on the left (for batched
  generation).
- Image processor: CLIP's, at 64x64 with CLIP's mean/std; on a 64x64 image resize and
  crop are identities, so pixels are ``(x / 255 - mean) / std`` exactly as training
  computes them on the GPU (:func:`normalize`).
- Chat template: LLaVA-1.5 style, ``USER: <image>\\n{text} ASSISTANT:``; an assistant
  turn ends with ``</s>``.
- ``LlavaProcessor`` with ``patch_size=8``, ``num_additional_image_tokens=1`` (CLS) and
  ``vision_feature_select_strategy="default"``: ``<image>`` expands to 64 tokens, the
  number of patch features the model's vision tower hands the language model.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from vlmfix.testbed import catalog as cat

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "NUM_IMAGE_TOKENS",
    "VOCAB",
    "build_tokenizer",
    "build_image_processor",
    "build_processor",
    "prompt_text",
    "normalize",
]

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_IMAGE_TOKENS = (cat.IMAGE_SIZE // cat.PATCH_SIZE) ** 2  # 64 (CLS dropped by "default")

VOCAB: dict[str, int] = {w: i for i, w in enumerate(cat.SPECIAL_TOKENS + cat.WORDS)}

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "ASSISTANT: {% for p in parts if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{{ eos_token }} "
    "{%- elif message['role'] == 'system' -%}"
    "{% for p in parts if p['type'] == 'text' %}{{ p['text'] }} {% endfor %}"
    "{%- else -%}"
    "USER: {% for p in parts if p['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for p in parts if p['type'] == 'text' %}{{ p['text'] }} {% endfor %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def build_tokenizer():
    """The word-level ``PreTrainedTokenizerFast`` (``len == len(VOCAB)``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", VOCAB["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # "a knife ." -> "a knife."
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in cat.SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    return fast


def build_image_processor():
    """CLIP image processor at 64x64 (torchvision-backed when torchvision is installed)."""
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import CLIPImageProcessor as cls
    else:  # what transformers falls back to anyway, minus its warning
        from transformers import CLIPImageProcessorPil as cls
    return cls(
        do_resize=True,
        size={"shortest_edge": cat.IMAGE_SIZE},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": cat.IMAGE_SIZE, "width": cat.IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def build_processor():
    """The testbed's ``LlavaProcessor`` (tokenizer + image processor + chat template)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=cat.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )


def prompt_text(processor: Any, prompt: str) -> str:
    """The chat-template text of one image + ``prompt`` user turn, ready for generation."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``[N, 64, 64, 3]`` uint8 -> ``[N, 3, 64, 64]`` float32 pixel values, as the processor."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN, device=x.device)[None, :, None, None]
    std = torch.tensor(IMAGE_STD, device=x.device)[None, :, None, None]
    return (x - mean) / std
