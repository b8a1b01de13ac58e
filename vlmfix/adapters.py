"""Per-family model adapters: where things live inside each LLaVA variant.

An adapter is data, not code paths: dotted attribute paths plus a description of how a
family lays out the image tokens it writes into ``input_ids``. Everything that touches a
model goes through :func:`get_adapter`, so supporting a new family is one table entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlmfix.errors import UnsupportedModelError

__all__ = ["Adapter", "ADAPTERS", "get_adapter", "supported_model_types", "image_token_structure"]


@dataclass(frozen=True)
class Adapter:
    """Where the parts of one LLaVA family live, as dotted attribute paths.

    Attributes:
        family: short family name (``llava``, ``llava_next``, ``llava_onevision``).
        model_type: ``config.model_type`` of the checkpoints this adapter serves.
        model_class: name of the transformers class to load them with.
        language_model: path of the decoder stack (a ``*Model`` with ``.layers``).
        layers: path of the ``nn.ModuleList`` of decoder layers.
        lm_head: path of the output projection.
        vision_tower: path of the vision encoder.
        embed_tokens: path of the LM's input embedding.
        final_norm: path of the LM's final norm (applied before ``lm_head``).
        layer_mlp: path of the MLP inside one decoder layer (relative to the layer).
        image_newline: path of the learned newline embedding (any-res families), or None.
        grid: how image tokens are arranged: ``"single"`` (one base grid),
            ``"anyres"`` (LLaVA-NeXT: base grid + unpadded any-res grid with a newline
            after every row) or ``"anyres_max"`` (LLaVA-OneVision: the same, with the
            any-res grid bilinearly shrunk when it exceeds ``anyres_max_N`` crops).
    """

    family: str
    model_type: str
    model_class: str
    language_model: str = "model.language_model"
    layers: str = "model.language_model.layers"
    lm_head: str = "lm_head"
    vision_tower: str = "model.vision_tower"
    embed_tokens: str = "model.language_model.embed_tokens"
    final_norm: str = "model.language_model.norm"
    layer_mlp: str = "mlp"
    image_newline: str | None = None
    grid: str = "single"
    extra: dict = field(default_factory=dict)

    def get(self, model: torch.nn.Module, what: str):
        """Resolve one of this adapter's paths (``"layers"``, ``"lm_head"``, ...) on ``model``."""
        path = getattr(self, what)
        if path is None:
            return None
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def decoder_layers(self, model) -> torch.nn.ModuleList:
        return self.get(model, "layers")

    def attention_modules(self, model) -> list[torch.nn.Module]:
        """The self-attention module of every decoder layer, in layer order."""
        return [layer.self_attn for layer in self.decoder_layers(model)]

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)

    def text_config(self, model):
        return model.config.text_config


ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in (
        Adapter("llava", "llava", "LlavaForConditionalGeneration"),
        Adapter(
            "llava_next",
            "llava_next",
            "LlavaNextForConditionalGeneration",
            image_newline="model.image_newline",
            grid="anyres",
        ),
        Adapter(
            "llava_onevision",
            "llava_onevision",
            "LlavaOnevisionForConditionalGeneration",
            image_newline="model.image_newline",
            grid="anyres_max",
        ),
    )
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_config) -> Adapter:
    """Return the adapter for a model (or its config).

    Raises:
        UnsupportedModelError: the ``model_type`` is not a supported LLaVA family.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported; vlmfix supports "
            f"{', '.join(supported_model_types())} (LlavaForConditionalGeneration, "
            "LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)"
        )
    return ADAPTERS[model_type]


# --------------------------------------------------------------------------- image grids
def _unpadded_size(h: int, w: int, orig_h: int, orig_w: int) -> tuple[int, int]:
    """Size of the feature grid ``h x w`` after removing the letterbox padding that the
    any-res preprocessing added around an ``orig_h x orig_w`` image."""
    if orig_w / orig_h > w / h:
        new_h = int(round(orig_h * (w / orig_w), 7))
        pad = (h - new_h) // 2
        return h - 2 * pad, w
    new_w = int(round(orig_w * (h / orig_h), 7))
    pad = (w - new_w) // 2
    return h, w - 2 * pad


def image_token_structure(model_config, adapter: Adapter, image_size, n_tokens: int):
    """Describe how one image's ``n_tokens`` consecutive image tokens are arranged.

    Args:
        model_config: the top-level model config.
        adapter: the model's adapter.
        image_size: ``(height, width)`` of the original image (any-res families), or None.
        n_tokens: the number of image tokens the processor wrote for this image.

    Returns:
        An int8 tensor ``[n_tokens]`` of parts: 1 = base grid, 2 = any-res grid,
        3 = ``image_newline``; or None when the count does not match the family's
        arrangement (then every token is treated as a base-grid token).
    """
    from vlmfix.layout import Part

    parts = torch.full((n_tokens,), Part.BASE, dtype=torch.int8)
    if adapter.grid == "single":
        return parts
    vcfg = model_config.vision_config
    side = vcfg.image_size // vcfg.patch_size
    base = side * side
    if n_tokens == base + 1:  # a single crop: base grid followed by one newline
        parts[-1] = Part.NEWLINE
        return parts
    if image_size is None:
        return None
    from vlmfix._compat import select_best_resolution

    orig_h, orig_w = (int(x) for x in image_size)
    best_h, best_w = select_best_resolution((orig_h, orig_w), model_config.image_grid_pinpoints)
    rows, cols = best_h // vcfg.image_size * side, best_w // vcfg.image_size * side
    rows, cols = _unpadded_size(rows, cols, orig_h, orig_w)
    if adapter.grid == "anyres_max":
        max_crops = int(str(getattr(model_config, "vision_aspect_ratio", "anyres_max_9")).split("_")[-1])
        ratio = math.sqrt(rows * cols / (max_crops * side * side))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    if base + rows * (cols + 1) != n_tokens:
        return None
    grid = torch.full((rows, cols + 1), Part.GRID, dtype=torch.int8)
    grid[:, -1] = Part.NEWLINE
    parts[base:] = grid.flatten()
    return parts
