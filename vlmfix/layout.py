"""Per-batch token layouts: which key position holds text, image or padding.

A :class:`Layout` is built once at prefill from the full ``input_ids`` (decode steps see
only the new token) and extended by one ``TEXT`` column per generated token. Attention
methods read it to find image keys, the image span and padding without ever hard-coding
an offset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import IntEnum

import torch

from vlmfix.adapters import Adapter, image_token_structure

__all__ = ["Label", "Part", "Layout", "build_layout", "resolve_parts_from_embeddings"]

logger = logging.getLogger(__name__)


class Label(IntEnum):
    """What a key position holds. ``*_SINK`` labels are per-layer overlays set by methods."""

    TEXT = 0
    TEXT_SINK = 1
    IMAGE = 2
    IMAGE_SINK = 3
    PAD = 4


class Part(IntEnum):
    """Where an image position sits inside its image's token block."""

    NONE = 0  # not an image token
    BASE = 1  # the base (global) grid
    GRID = 2  # the any-res grid (LLaVA-NeXT / OneVision)
    NEWLINE = 3  # an ``image_newline`` token


@dataclass(frozen=True)
class Layout:
    """Labels of every key position of a batch.

    Attributes:
        labels: int8 ``[B, L]`` of :class:`Label` values (no sink labels here).
        parts: int8 ``[B, L]`` of :class:`Part` values.
        image_start: long ``[B]``, first image position per sample (-1 when none).
        image_end: long ``[B]``, one past the last image position (-1 when none).
        prompt_length: ``L`` at prefill; positions ``>= prompt_length`` were generated.
        unresolved: ``(b, start, end)`` image runs whose any-res parts are not known yet
            (see :func:`resolve_parts_from_embeddings`).
        has_image: whether any sample holds an image token (known on the host, so methods
            can skip work without a device sync).
    """

    labels: torch.Tensor
    parts: torch.Tensor
    image_start: torch.Tensor
    image_end: torch.Tensor
    prompt_length: int
    unresolved: tuple = ()
    has_image: bool = True

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def length(self) -> int:
        return self.labels.shape[1]

    @property
    def image_mask(self) -> torch.Tensor:
        """Bool ``[B, L]``: image tokens (newline tokens included)."""
        return (self.labels == Label.IMAGE) | (self.labels == Label.IMAGE_SINK)

    @property
    def pad_mask(self) -> torch.Tensor:
        return self.labels == Label.PAD

    @property
    def text_mask(self) -> torch.Tensor:
        return (self.labels == Label.TEXT) | (self.labels == Label.TEXT_SINK)

    def extend(self, n: int = 1, attention_mask: torch.Tensor | None = None) -> Layout:
        """Append ``n`` generated positions (``TEXT``; ``PAD`` where ``attention_mask`` is 0).

        Args:
            n: number of new positions.
            attention_mask: optional ``[B, n]`` (or longer; the last ``n`` columns are used).
        """
        new = torch.full((self.batch_size, n), Label.TEXT, dtype=torch.int8, device=self.labels.device)
        if attention_mask is not None:
            tail = attention_mask[:, -n:].to(self.labels.device)
            new = torch.where(tail.bool(), new, torch.full_like(new, Label.PAD))
        zeros = torch.zeros((self.batch_size, n), dtype=torch.int8, device=self.parts.device)
        return replace(
            self,
            labels=torch.cat([self.labels, new], dim=1),
            parts=torch.cat([self.parts, zeros], dim=1),
        )

    def select(self, rows: torch.Tensor | list[int]) -> Layout:
        """The layout of a subset (or repetition) of the batch rows."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.labels.device)
        return replace(
            self,
            labels=self.labels[idx],
            parts=self.parts[idx],
            image_start=self.image_start[idx],
            image_end=self.image_end[idx],
        )

    def to(self, device) -> Layout:
        return replace(
            self,
            labels=self.labels.to(device),
            parts=self.parts.to(device),
            image_start=self.image_start.to(device),
            image_end=self.image_end.to(device),
        )


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of True values."""
    runs, start = [], None
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(flags)))
    return runs


def build_layout(
    model_config,
    adapter: Adapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
) -> Layout:
    """Build the layout of a batch from its full prompt ids.

    Image positions are the positions holding ``config.image_token_id``. Each maximal run
    of them is one image (images are assigned to runs in batch order, matching how the
    processors expand ``<image>``); for any-res families each run is split into base
    grid, any-res grid and ``image_newline`` parts.

    Args:
        model_config: top-level model config.
        adapter: the model's adapter.
        input_ids: long ``[B, L]``.
        attention_mask: ``[B, L]``, 0 at padding (None: no padding).
        image_sizes: ``[num_images, 2]`` original (height, width) per image, any-res only.

    Returns:
        The :class:`Layout`.
    """
    device = input_ids.device
    image_id = int(model_config.image_token_id)
    is_image = input_ids == image_id
    labels = torch.where(is_image, Label.IMAGE, Label.TEXT).to(torch.int8)
    if attention_mask is not None:
        labels = torch.where(attention_mask.to(device).bool(), labels, torch.full_like(labels, Label.PAD))
    parts = torch.zeros_like(labels)
    B = input_ids.shape[0]
    starts = torch.full((B,), -1, dtype=torch.long)
    ends = torch.full((B,), -1, dtype=torch.long)
    flags = is_image.cpu().tolist()
    sizes = image_sizes.tolist() if image_sizes is not None else None
    image_idx = 0
    unresolved = []
    for b in range(B):
        runs = _runs(flags[b])
        if runs:
            starts[b], ends[b] = runs[0][0], runs[-1][1]
        for s, e in runs:
            size = sizes[image_idx] if sizes is not None and image_idx < len(sizes) else None
            structure = image_token_structure(model_config, adapter, size, e - s)
            if structure is None and size is None:
                # No image sizes (e.g. transformers' generate passed pre-encoded image
                # features): resolve_parts_from_embeddings() fills this in at the LM input.
                unresolved.append((b, s, e))
                structure = torch.full((e - s,), Part.BASE, dtype=torch.int8)
            elif structure is None:
                logger.warning(
                    "image %d: %d image tokens do not match the %s grid for size %s; "
                    "treating them all as base-grid tokens",
                    image_idx,
                    e - s,
                    adapter.family,
                    size,
                )
                structure = torch.full((e - s,), Part.BASE, dtype=torch.int8)
            parts[b, s:e] = structure.to(device)
            image_idx += 1
    return Layout(
        labels=labels,
        parts=parts,
        image_start=starts.to(device),
        image_end=ends.to(device),
        prompt_length=input_ids.shape[1],
        unresolved=tuple(unresolved),
        has_image=any(any(row) for row in flags),
    )


def resolve_parts_from_embeddings(
    layout: Layout, model_config, inputs_embeds: torch.Tensor, image_newline: torch.Tensor
) -> Layout:
    """Fill in the any-res parts of images whose sizes were unknown at layout time.

    The processors write the learned ``image_newline`` vector verbatim at every newline
    position, so those positions are found by exact equality in the LM's input
    embeddings; the first ``(image_size / patch_size) ** 2`` tokens of each image are its
    base grid and the rest its any-res grid.

    Args:
        layout: a layout with ``unresolved`` image runs.
        model_config: top-level model config.
        inputs_embeds: ``[B, L, E]`` LM input embeddings of the same batch.
        image_newline: ``[E]``.
    """
    if not layout.unresolved:
        return layout
    vcfg = model_config.vision_config
    base = (vcfg.image_size // vcfg.patch_size) ** 2
    parts = layout.parts.clone()
    newline = image_newline.to(inputs_embeds.dtype)
    for b, s, e in layout.unresolved:
        is_nl = (inputs_embeds[b, s:e] == newline).all(dim=-1).to(parts.device)
        run = torch.full((e - s,), Part.GRID, dtype=torch.int8, device=parts.device)
        run[: min(base, e - s)] = Part.BASE
        run[is_nl] = Part.NEWLINE
        parts[b, s:e] = run
    return replace(layout, parts=parts, unresolved=())
