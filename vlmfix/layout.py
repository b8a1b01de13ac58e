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
from functools import cached_property

import torch

from vlmfix.adapters import Adapter, image_token_structure

__all__ = ["Label", "Part", "Layout", "build_layout", "positions_from_mask", "text_layout", "resolve_parts_from_embeddings"]

logger = logging.getLogger(__name__)


# The position of a static map's future columns: no query position reaches it. It fits
# int32, the kernels' position type (a larger value would wrap around to a visible one).
UNREACHABLE = 2**30


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
    """Labels and positions of every key position of a batch.

    The tensors are views of preallocated buffers: :meth:`extend` writes the new columns in
    place (growing the buffers geometrically when full), so decoding appends without a
    ``torch.cat`` per step, and earlier ``Layout`` objects keep seeing their own length.

    Attributes:
        labels: int8 ``[B, L]`` of :class:`Label` values (no sink labels here).
        parts: int8 ``[B, L]`` of :class:`Part` values.
        positions: long ``[B, L]``, each key's token position (``cumsum(mask) - 1``;
            0 at padding). Masks are built from positions, never from key indices.
        image_start: long ``[B]``, first image position per sample (-1 when none).
        image_end: long ``[B]``, one past the last image position (-1 when none).
        prompt_length: ``L`` at prefill; positions ``>= prompt_length`` were generated.
        unresolved: ``(b, start, end)`` image runs whose any-res parts are not known yet
            (see :func:`resolve_parts_from_embeddings`).
        has_image: whether any sample holds an image token (known on the host, so methods
            can skip work without a device sync).
        padded: whether any prompt key is padding (known on the host; without padding
            plain attention may take a flash kernel). Generated positions are taken to be
            attended (as in every decoding loop); :meth:`extend` labels a masked one PAD but
            does not sync to update this flag.
    """

    buffers: tuple  # (labels, parts, positions), each [B, capacity]
    length: int
    image_start: torch.Tensor
    image_end: torch.Tensor
    prompt_length: int
    unresolved: tuple = ()
    has_image: bool = True
    padded: bool = False
    static_base: int | None = None

    @classmethod
    def from_tensors(
        cls,
        labels: torch.Tensor,
        parts: torch.Tensor,
        positions: torch.Tensor,
        image_start: torch.Tensor,
        image_end: torch.Tensor,
        prompt_length: int,
        *,
        unresolved: tuple = (),
        has_image: bool = True,
        padded: bool = False,
        capacity: int | None = None,
    ) -> Layout:
        """A layout over fresh buffers of ``capacity`` columns (default: the length)."""
        B, L = labels.shape
        cap = max(L, capacity or L)
        bufs = (
            torch.full((B, cap), Label.PAD, dtype=torch.int8, device=labels.device),
            torch.zeros((B, cap), dtype=torch.int8, device=labels.device),
            torch.zeros((B, cap), dtype=torch.long, device=labels.device),
        )
        for buf, t in zip(bufs, (labels, parts, positions)):
            buf[:, :L] = t
        return cls(bufs, L, image_start, image_end, prompt_length, unresolved, has_image, padded)

    @cached_property
    def labels(self) -> torch.Tensor:
        return self.buffers[0][:, : self.length]

    @cached_property
    def parts(self) -> torch.Tensor:
        return self.buffers[1][:, : self.length]

    @cached_property
    def positions(self) -> torch.Tensor:
        return self.buffers[2][:, : self.length]

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.buffers[0].shape[0]

    @cached_property
    def image_mask(self) -> torch.Tensor:
        """Bool ``[B, L]``: image tokens (newline tokens included)."""
        return (self.labels == Label.IMAGE) | (self.labels == Label.IMAGE_SINK)

    @cached_property
    def pad_mask(self) -> torch.Tensor:
        return self.labels == Label.PAD

    @cached_property
    def text_mask(self) -> torch.Tensor:
        return (self.labels == Label.TEXT) | (self.labels == Label.TEXT_SINK)

    def extend(self, n: int = 1, attention_mask: torch.Tensor | None = None) -> Layout:
        """Append ``n`` generated positions (``TEXT``; ``PAD`` where ``attention_mask`` is 0).

        New positions continue each row's last position. No device sync; the buffers are
        written in place and only reallocated (doubled) when full.

        Args:
            n: number of new positions.
            attention_mask: optional ``[B, n]`` (or longer; the last ``n`` columns are used).
        """
        L = self.length
        bufs = self.buffers
        if L + n > self.capacity:
            grown = Layout.from_tensors(
                self.labels, self.parts, self.positions, self.image_start, self.image_end, self.prompt_length,
                capacity=max(2 * self.capacity, L + n),
            )
            bufs = grown.buffers
        labels, parts, positions = bufs
        new = labels[:, L : L + n]
        new.fill_(Label.TEXT)
        if attention_mask is not None:
            tail = attention_mask[:, -n:].to(labels.device).bool()
            new.masked_fill_(~tail, Label.PAD)
        parts[:, L : L + n] = 0
        step = torch.arange(1, n + 1, device=positions.device)
        positions[:, L : L + n] = positions[:, L - 1 : L] + step if L > 0 else step - 1
        return replace(self, buffers=bufs, length=L + n)

    def as_static(self, capacity: int, into: tuple | None = None) -> Layout:
        """This map with exactly ``capacity`` columns, for the static decode path
        (:mod:`vlmfix.fastpath`): the columns from :attr:`length` on are ``PAD`` with an
        unreachable position, so neither the label rule nor the position rule lets a query
        see them until :meth:`write_static` fills them in.

        ``into``: ``(labels, parts, positions, image_start, image_end)`` buffers of exactly
        ``[B, capacity]`` / ``[B]`` to copy the map into (a reused captured step reads them)."""
        L = self.length
        if capacity < L:
            from vlmfix.errors import StateError

            raise StateError(f"a static map of {capacity} columns cannot hold the {L} filled ones")
        bufs = self.buffers
        starts, ends = self.image_start, self.image_end
        if into is not None:
            *bufs, starts, ends = into
            for buf, src in zip(bufs, (self.labels, self.parts, self.positions)):
                buf[:, :L] = src
            starts.copy_(self.image_start)
            ends.copy_(self.image_end)
        elif self.capacity < capacity:
            bufs = Layout.from_tensors(
                self.labels, self.parts, self.positions, self.image_start, self.image_end, self.prompt_length,
                capacity=capacity,
            ).buffers
        labels, parts, positions = (b[:, :capacity] for b in bufs)
        labels[:, L:] = Label.PAD
        parts[:, L:] = 0
        positions[:, L:] = UNREACHABLE
        return replace(
            self, buffers=(labels, parts, positions), length=capacity, static_base=L, image_start=starts, image_end=ends
        )

    def write_static(self, index: torch.Tensor, position: torch.Tensor, base: torch.Tensor | None = None) -> Layout:
        """Fill column ``static_base + index`` of a static map (``index``: 0-dim long, the
        generated tokens already in the map) with a generated token at ``position`` (long
        ``[B, 1]``), in place on the device; returns a fresh map object over the same
        buffers (so masks derived from the labels are recomputed). ``base``: a 0-dim device
        tensor holding ``static_base`` (a captured step that later calls reuse must not
        bake the prompt length of the first call into its graph)."""
        col = (index + (self.static_base if base is None else base)).view(1)
        labels, _, positions = self.buffers
        labels.index_fill_(1, col, int(Label.TEXT))
        positions.index_copy_(1, col, position.to(positions.dtype))
        return replace(self)

    def select(self, rows: torch.Tensor | list[int]) -> Layout:
        """The layout of a subset (or repetition) of the batch rows."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.buffers[0].device)
        return replace(
            self,
            buffers=tuple(b[idx] for b in self.buffers),
            image_start=self.image_start[idx],
            image_end=self.image_end[idx],
        )

    def to(self, device) -> Layout:
        return replace(
            self,
            buffers=tuple(b.to(device) for b in self.buffers),
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
    capacity: int | None = None,
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
        capacity: columns to preallocate for decoding (default: the prompt length).

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
    if attention_mask is not None:
        valid = attention_mask.to(device).long()
        positions = positions_from_mask(valid)
        padded = not bool(valid.all())  # one host sync, at prefill only
    else:
        positions = torch.arange(input_ids.shape[1], device=device).expand(B, -1)
        padded = False
    return Layout.from_tensors(
        labels,
        parts,
        positions,
        starts.to(device),
        ends.to(device),
        input_ids.shape[1],
        unresolved=tuple(unresolved),
        has_image=any(any(row) for row in flags),
        padded=padded,
        capacity=capacity,
    )


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Token positions ``[B, L]`` of a left-padded batch: ``cumsum(mask) - 1``, 0 at padding
    (the position ids transformers' ``generate`` gives the same batch)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def text_layout(attention_mask: torch.Tensor) -> Layout:
    """The layout of a text-only, left-padded batch (``attention_mask`` ``[B, L]``)."""
    valid = attention_mask.long()
    B, L = valid.shape
    labels = torch.where(valid.bool(), Label.TEXT, Label.PAD).to(torch.int8)
    positions = positions_from_mask(valid)
    none = torch.full((B,), -1, dtype=torch.long, device=valid.device)
    return Layout.from_tensors(
        labels, torch.zeros_like(labels), positions, none, none, L, has_image=False, padded=True
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
    parts = layout.buffers[1].clone()
    newline = image_newline.to(inputs_embeds.dtype)
    for b, s, e in layout.unresolved:
        is_nl = (inputs_embeds[b, s:e] == newline).all(dim=-1).to(parts.device)
        run = torch.full((e - s,), Part.GRID, dtype=torch.int8, device=parts.device)
        run[: min(base, e - s)] = Part.BASE
        run[is_nl] = Part.NEWLINE
        parts[b, s:e] = run
    return replace(layout, buffers=(layout.buffers[0], parts, layout.buffers[2]), unresolved=())
