"""Tiny, randomly initialised LLaVA-family models built offline from configs.

They exercise exactly the code paths of real checkpoints (same model classes, same
processors, same image-token expansion) at a size that runs on a laptop CPU in
milliseconds. Their generations are meaningless. Used by the test-suite and by the
``tiny-random`` model name of :func:`vlmfix.load`.

Example:
    >>> from vlmfix.testing import build_tiny
    >>> model, processor = build_tiny("llava_next")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch

from vlmfix.errors import UnsupportedModelError

__all__ = ["TINY_FAMILIES", "LLAVA15_CHAT_TEMPLATE", "build_tiny", "build_tiny_tokenizer", "emulated_graphs"]

logger = logging.getLogger(__name__)

TINY_FAMILIES = ("llava", "llava_next", "llava_onevision")

# A small English vocabulary so that decoded text looks like words. Index 0..4 are
# reserved for the special tokens below.
_WORDS = (
    "USER ASSISTANT : . , ? ! a an the is are there in on of and with to it this that "
    "image picture photo describe what do you see yes no not answer question using single "
    "word or phrase person man woman child dog cat bird horse sheep cow car bus truck "
    "bicycle train boat plane chair couch bed table cup bottle knife fork spoon bowl "
    "banana apple pizza cake laptop mouse keyboard phone book clock vase tv remote sink "
    "toilet frisbee surfboard kite umbrella bag tie red green blue white black small "
    "large two three many next near under above left right front behind sitting standing "
    "holding playing eating looking street room water grass sky field road wall floor"
).split()
_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")

# LLaVA-1.5's conversation format, written as a Jinja chat template.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] if message['content'] is not string else message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_tokenizer(video_token: bool = False):
    """A word-level fast tokenizer with LLaVA's special tokens (``<image>`` included).

    Args:
        video_token: also define ``<video>`` (appended after the words, so the other ids
            do not move). Processors with a video modality (LLaVA-OneVision) need it: they
            count video tokens in every prompt, and an undefined ``<video>`` resolves to
            ``<unk>``, so any out-of-vocabulary word would count as a video token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    special = {"image_token": "<image>"}
    if video_token:
        vocab["<video>"] = len(vocab)
        special["video_token"] = "<video>"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=special,
        padding_side="left",
    )
    return fast


def _vision_config(family: str):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    if family == "llava_onevision":
        return SiglipVisionConfig(**common)
    return CLIPVisionConfig(projection_dim=32, **common)


def _text_config(family: str, vocab_size: int, head_dim: int | None = None):
    from transformers import LlamaConfig, Qwen2Config

    extra = {} if head_dim is None else {"head_dim": head_dim}
    common = dict(
        **extra,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "llava_onevision":
        # Qwen2 LM with grouped-query attention, as in LLaVA-OneVision.
        return Qwen2Config(num_key_value_heads=2, **common)
    return LlamaConfig(num_key_value_heads=4, **common)


_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _onevision_processor_cls():
    """The OneVision processor class, usable without a video processor.

    transformers 5.x type-checks every processor attribute on construction, including an
    absent video processor, whose base class only imports with torchvision. Images never
    touch the video processor, so the tiny model skips that one check in a subclass.
    """
    from transformers import LlavaOnevisionProcessor

    class TinyOnevisionProcessor(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return TinyOnevisionProcessor


def build_tiny(
    family: str = "llava",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    head_dim: int | None = None,
):
    """Build a tiny random model of one LLaVA family with a matching processor.

    Args:
        family: ``"llava"`` (LLaVA-1.5 layout: CLIP + Llama), ``"llava_next"`` (any-res
            grid with ``image_newline``) or ``"llava_onevision"`` (SigLIP + Qwen2, GQA).
        seed: seed of the weight initialisation (same seed, same weights).
        dtype: parameter dtype.
        attn_implementation: initial attention implementation of every sub-model.
        head_dim: LM attention head dim (default ``hidden_size / heads`` = 16); 64 gives
            shapes the Triton kernels take.

    Returns:
        ``(model, processor)`` in eval mode on the CPU.
    """
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaProcessor,
    )

    if family not in TINY_FAMILIES:
        raise UnsupportedModelError(f"family={family!r} is not a tiny model family; choose one of {TINY_FAMILIES}")
    tokenizer = build_tiny_tokenizer(video_token=family == "llava_onevision")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = _vision_config(family)
    text = _text_config(family, vocab_size=len(tokenizer), head_dim=head_dim)
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]

    with warnings.catch_warnings():
        # transformers warns that it falls back to the PIL image processors when
        # torchvision is absent; that is the expected path on CPU-only installs.
        warnings.simplefilter("ignore")
        if family == "llava":
            from transformers import CLIPImageProcessor

            config = LlavaConfig(
                vision_config=vision,
                text_config=text,
                image_token_id=image_token_id,
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            )
            model_cls, proc_cls = LlavaForConditionalGeneration, LlavaProcessor
            image_processor = CLIPImageProcessor(
                size={"shortest_edge": 32},
                crop_size={"height": 32, "width": 32},
                image_mean=mean,
                image_std=std,
            )
        elif family == "llava_next":
            from transformers import LlavaNextImageProcessor

            config = LlavaNextConfig(
                vision_config=vision,
                text_config=text,
                image_token_id=image_token_id,
                image_grid_pinpoints=_PINPOINTS,
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            )
            model_cls, proc_cls = LlavaNextForConditionalGeneration, LlavaNextProcessor
            image_processor = LlavaNextImageProcessor(
                size={"shortest_edge": 32},
                crop_size={"height": 32, "width": 32},
                image_grid_pinpoints=_PINPOINTS,
                image_mean=mean,
                image_std=std,
            )
        else:
            from transformers import LlavaOnevisionImageProcessor

            config = LlavaOnevisionConfig(
                vision_config=vision,
                text_config=text,
                image_token_id=image_token_id,
                video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                image_grid_pinpoints=_PINPOINTS,
                vision_feature_layer=-1,
                vision_feature_select_strategy="full",
                vision_aspect_ratio="anyres_max_9",
            )
            model_cls, proc_cls = LlavaOnevisionForConditionalGeneration, _onevision_processor_cls()
            image_processor = LlavaOnevisionImageProcessor(
                size={"height": 32, "width": 32},
                image_grid_pinpoints=_PINPOINTS,
                image_mean=[0.5, 0.5, 0.5],
                image_std=[0.5, 0.5, 0.5],
            )
        config._attn_implementation = attn_implementation
        config._name_or_path = f"tiny-random:{family}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
            # Random init leaves these near zero; a visible newline makes layout tests
            # meaningful (newline positions are found by embedding equality there).
            for name, param in model.named_parameters():
                if name.endswith("image_newline"):
                    param.data.normal_()
        model = model.to(dtype).eval()
        extra = {}
        if family != "llava_onevision":
            extra["vision_feature_select_strategy"] = "default"
            extra["num_additional_image_tokens"] = 1
        else:
            extra["vision_feature_select_strategy"] = "full"
            extra["num_image_tokens"] = (32 // 8) ** 2
        processor = proc_cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=8,
            chat_template=LLAVA15_CHAT_TEMPLATE,
            **extra,
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


@contextmanager
def emulated_graphs():
    """Inside this block ``decode_path="graph"`` works without CUDA: the decode step is
    captured and replayed by :class:`vlmfix.fastpath.EmulatedGraph`, which gives it a CUDA
    graph's semantics on the CPU (Python runs it once, replays repeat only the recorded
    tensor ops, host syncs are refused). For tests; it makes nothing faster.

    Example:
        >>> with emulated_graphs():  # doctest: +SKIP
        ...     out = vlmfix.generate(model, processor, images, prompts, decode_path="graph")
    """
    from vlmfix import fastpath

    before = fastpath._EMULATE
    fastpath._EMULATE = True
    try:
        yield
    finally:
        fastpath._EMULATE = before
