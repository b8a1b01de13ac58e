"""Small helpers shared by the attention-level methods (VAR, PAI, VHR, PAINT).

* :func:`layer_set` turns a method's layer options into the set of decoder layers it
  edits, scaled to the model's depth.
* :class:`SequenceTracker` remembers where the prompt of the sequence being generated
  ends, so that "the last prompt row and every generated row" means the same with the KV
  cache on (prefill, then one row per step) and off (every step is a fresh prefill of
  the whole sequence).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["layer_set", "scaled_layers", "SequenceTracker", "query_positions", "rms_normalise", "edit_rows", "probing_prefill", "probe_attention", "DecodeRowCount", "accumulate"]


def check_layer_fields(config) -> None:
    """Validate the ``start_layer`` / ``end_layer`` / ``layers`` fields shared by the
    layer-ranged methods (raises ConfigError naming the field)."""
    config._check(isinstance(config.start_layer, int) and config.start_layer >= 0, "start_layer", "an int >= 0")
    config._check(isinstance(config.end_layer, int), "end_layer", "an int (<= 0 counts from the depth)")
    config._check(
        isinstance(config.layers, tuple) and all(isinstance(i, int) for i in config.layers),
        "layers",
        "a tuple of ints, e.g. (2, 3, 4)",
    )


def scaled_layers(start: int, end: int, num_layers: int) -> list[int]:
    """Layers ``start .. end - 1`` with python-slice semantics (negative ``end`` counts
    from the last layer), clipped to ``[0, num_layers)``.

    The papers state their ranges for 32-layer LMs (e.g. PAI: layers 2..31, VAR: 2..30);
    written as ``start=2, end=0`` / ``start=2, end=-1`` they keep their meaning ("all but the
    first two", "... and not the last") at any depth.
    """
    stop = num_layers + end if end <= 0 else min(end, num_layers)
    return [i for i in range(max(0, start), stop)]


def layer_set(layers: tuple[int, ...], start: int, end: int, num_layers: int, method: str = "method") -> frozenset[int]:
    """Explicit ``layers`` (negative indices count from the end) when given, else the
    :func:`scaled_layers` range.

    Raises:
        ConfigError: an explicit layer index outside ``[-num_layers, num_layers)``.
    """
    if layers:
        bad = [i for i in layers if not -num_layers <= i < num_layers]
        if bad:
            from vlmfix.errors import ConfigError

            raise ConfigError(
                f"{method}: layers={tuple(layers)!r} has {bad} outside this model's {num_layers} "
                f"decoder layers; use indices in [-{num_layers}, {num_layers})"
            )
        return frozenset(i % num_layers for i in layers)
    return frozenset(scaled_layers(start, end, num_layers))


def query_positions(call) -> torch.Tensor:
    """Key-axis positions of the query rows, ``[Tq]``, on the query's device."""
    return torch.arange(call.k_len - call.q_len, call.k_len, device=call.query.device)


def edit_rows(call, tracker: SequenceTracker):
    """The rows edited by the "last prompt row and every generated row" methods (PAI, PAINT).

    Returns:
        None when every row of the call is edited (every decode step), False when none is,
        else a bool ``[1, Tq]`` row mask (a prefill: only its rows from the last prompt row
        on). Decided on the host from shapes: no device sync.
    """
    last = tracker.last_prompt_row(call)
    full = call.controller.layout
    if full is not None and call.layout is not None and call.layout is not full:
        # A layer that keeps fewer keys (token pruning) dropped only prompt keys: the last
        # prompt row moves left by their number (host-side lengths, no sync).
        last -= full.length - call.layout.length
    first = call.k_len - call.q_len  # key position of the call's first query row
    if first >= last:
        return None
    if call.k_len - 1 < last:
        return False
    return (torch.arange(first, call.k_len, device=call.layout.labels.device) >= last)[None, :]


def probing_prefill(call) -> bool:
    """True in the prefill of a probe forward of :func:`vlmfix.generate` (the forward in
    which AvisC, AGLA and RBD measure attention)."""
    rows = call.controller.rows
    return rows is not None and rows.probing and call.is_prefill


def probe_attention(call, result) -> tuple[torch.Tensor, torch.Tensor]:
    """At a probe forward: the main rows' head-averaged last-row attention on the unedited
    scores (``RowStats``), fp32 ``[B, Tk]``, and their image mask ``[B, Tk]``. Other methods'
    probe-only rows, which may follow the main rows, are left out."""
    main = call.controller.rows.main_rows
    return result.row_stats.probs[main].mean(1), call.layout.image_mask[main]


def accumulate(total, value: torch.Tensor) -> torch.Tensor:
    """``total + value`` for a device-side telemetry counter: a new tensor the first time
    (``total`` a number), then added in place, so a replayed CUDA graph of a decode step
    keeps adding (a rebound ``total = total + value`` would be frozen at capture). The
    first call must happen eagerly (at the prefill or the first decode step)."""
    if not isinstance(total, torch.Tensor):
        return value + total
    return total.add_(value)


def rms_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMS normalisation over the last dimension (fp32)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class SequenceTracker:
    """Where the prompt of the current sequence ends, in key positions.

    With the KV cache on, a sequence is one prefill followed by decode steps. With it off,
    every step is a prefill of the whole sequence; a prefill whose ``input_ids`` extend the
    previous prefill's ids (same batch, same prefix, longer), with no decode step in
    between, continues that sequence. Anything else starts a new one.

    Attributes:
        prompt_length: padded prompt length ``L`` of the current sequence; the last prompt
            row is at key position ``L - 1``.
        new_sequence: True during the forward that started the current sequence.
    """

    def __init__(self) -> None:
        self.prompt_length: int | None = None
        self.new_sequence = False
        self._prev_ids: torch.Tensor | None = None

    def update(self, handle, kwargs: dict[str, Any]) -> None:
        """Call from :meth:`Method.on_forward`."""
        ids = kwargs.get("input_ids")
        if ids is None:
            embeds = kwargs.get("inputs_embeds")
            n = embeds.shape[1] if embeds is not None else 0
        else:
            n = ids.shape[1]
        if not handle.controller.is_prefill:
            self.new_sequence = False
            self._prev_ids = None  # a decode step: the next prefill starts a new sequence
            return
        prev = self._prev_ids
        continues = (
            prev is not None
            and ids is not None
            and self.prompt_length is not None
            and ids.shape[0] == prev.shape[0]
            and ids.shape[1] > prev.shape[1]
            and torch.equal(ids[:, : prev.shape[1]], prev)
        )
        self.new_sequence = not continues
        if not continues:
            self.prompt_length = n
        self._prev_ids = ids

    def last_prompt_row(self, call) -> int:
        """Key position of the last prompt row (falls back to the last row of the call)."""
        if self.prompt_length is None:
            return call.k_len - 1
        return self.prompt_length - 1


class DecodeRowCount:
    """Decode row-heads an attention method edited, counted without a device op per layer.

    Per sequence, the number of samples with an image is a device scalar taken once; the
    row-heads of each decode call are counted on the host. :meth:`total` multiplies them
    (one sync per sequence, in ``stats()``).
    """

    def __init__(self) -> None:
        # id(image_end) -> [image_end (kept alive, so the id stays unique), samples, row-heads]
        self._seqs: dict[int, list] = {}
        self._last: tuple[int, list, int] | None = None  # (forward, entry, row-heads added in it)

    def _entry(self, layout) -> list:
        entry = self._seqs.get(id(layout.image_end))
        if entry is None:
            ends = layout.image_end
            entry = self._seqs[id(ends)] = [ends, (ends >= 0).sum(), 0]
        return entry

    def add(self, layout, row_heads: int, forward: int = -1) -> None:
        entry = self._entry(layout)
        entry[2] += row_heads
        if self._last is not None and self._last[0] == forward and self._last[1] is entry:
            self._last = (forward, entry, self._last[2] + row_heads)
        else:
            self._last = (forward, entry, row_heads)

    @property
    def last_row_heads(self) -> int:
        """Row-heads counted in the last forward (0 before any)."""
        return self._last[2] if self._last is not None else 0

    def expect(self, layout, row_heads: int) -> None:
        """Count nothing yet, but let :meth:`repeat_last_forward` count forwards of
        ``row_heads`` over ``layout``'s samples (a reused captured decode step)."""
        self._last = (-1, self._entry(layout), row_heads)

    def repeat_last_forward(self, n: int) -> None:
        """Count the row-heads of the last forward ``n`` more times (CUDA graph replays)."""
        if self._last is not None:
            self._last[1][2] += self._last[2] * n

    def total(self) -> int:
        return sum(int(samples) * row_heads for _, samples, row_heads in self._seqs.values())
