"""PAI: Paying More Attention to Image (Liu et al., ECCV 2024), attention part.

Before the softmax, in layers 2..N-1, the scores of the *last query row* on image keys are
amplified: ``z <- z + alpha * |z|`` (``alpha = 0.2``). The optional classifier-free
guidance branch of PAI is a logit-level method and lives with the contrastive methods.

Deviations from the released code (all deliberate):

* The released code edits row ``-1`` of every forward. With the KV cache on that is the last
  prompt row at prefill and every generated row after it; vlmfix edits exactly those rows
  (tracked by :class:`~vlmfix.methods._attn_utils.SequenceTracker`), so decoding with the
  cache off gives the same tokens as with it on.
* Image keys come from the batch layout (every image token, any-res grid and newline
  tokens included) instead of a hard-coded ``35 .. 35 + 576`` span, so batches with left
  padding and LLaVA-NeXT / OneVision prompts work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vlmfix.methods import register
from vlmfix.methods._attn_utils import DecodeRowCount, SequenceTracker, check_layer_fields, edit_rows, layer_set
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["PAI", "PAIRuntime"]


@register
@dataclass(frozen=True)
class PAI(MethodConfig):
    """Amplify the last row's pre-softmax attention scores on image tokens.

    Args:
        alpha: amplification; ``z <- z + alpha * |z|`` on image keys. 0 changes nothing.
        start_layer, end_layer: edited layers ``start_layer .. end_layer - 1``; an
            ``end_layer <= 0`` counts from the depth (``0`` = through the last layer), so
            the paper's 2..31 of 32 layers keeps its meaning at any depth.
        layers: explicit layer indices; overrides ``start_layer`` / ``end_layer``.

    Example:
        >>> with vlmfix.attach(model, vlmfix.PAI(alpha=0.2)):  # doctest: +SKIP
        ...     out = model.generate(**inputs)
    """

    name: ClassVar[str] = "pai"
    order: ClassVar[int] = 200
    paper: ClassVar[str] = "Liu et al., Paying More Attention to Image, ECCV 2024 (arXiv:2407.21771)"

    alpha: float = help_field(0.2, "score amplification on image keys: z + alpha*|z| (released code: 0.2)")
    start_layer: int = help_field(2, "first edited decoder layer")
    end_layer: int = help_field(0, "one past the last edited layer; <= 0 counts from the depth (0 = last layer)")
    layers: tuple[int, ...] = help_field((), "explicit layer indices (overrides start_layer/end_layer)")

    def __post_init__(self):
        self._check(isinstance(self.alpha, (int, float)) and self.alpha >= 0, "alpha", "a number >= 0")
        check_layer_fields(self)

    def build(self) -> Method:
        return PAIRuntime(self)


class PAIRuntime(Method):
    config: PAI

    def __init__(self, config: PAI):
        super().__init__(config)
        self.tracker = SequenceTracker()
        self.layers: frozenset[int] = frozenset()
        self._rows = 0
        self._calls = 0
        self._decode_rows = DecodeRowCount()
        self._decode_calls = (-1, 0)  # (forward, decode calls edited in it)
        self._cached = None

    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        c = self.config
        self.layers = layer_set(c.layers, c.start_layer, c.end_layer, handle.controller.num_layers, c.name)

    def on_forward(self, handle, kwargs: dict[str, Any]) -> None:
        self.tracker.update(handle, kwargs)

    def contribute(self, call, plan) -> None:
        if call.layer_idx not in self.layers or self.config.alpha == 0 or not call.layout.has_image:
            return
        rows = edit_rows(call, self.tracker)
        if rows is False:
            return
        self._calls += 1
        layout = call.layout
        if self._cached is None or self._cached[0] is not layout:  # once per forward, not per layer
            image = layout.image_mask  # [B, Tk]
            self._cached = (layout, image[:, None, :] * float(self.config.alpha))
        coef = self._cached[1]
        if rows is None:  # a decode call: counted on the host (DecodeRowCount)
            forward = call.controller.forward_index
            self._decode_rows.add(layout, call.q_len * call.num_heads, forward)
            same = self._decode_calls[0] == forward
            self._decode_calls = (forward, self._decode_calls[1] + 1 if same else 1)
        else:  # accumulated on the device; read once in stats()
            self._rows = self._rows + rows.sum() * call.num_heads * (layout.image_end >= 0).sum()
        plan.score_rows = rows if rows is None else rows.expand(layout.batch_size, -1)
        plan.add_score_edit(coef)

    def graph_state(self):
        from vlmfix.fastpath import GraphState

        # The decode edit reads only the token map (kept with the step) and constants.
        layout = self.handle.controller.layout
        return GraphState(
            decisions=(layout is not None and layout.has_image,),
            per_step={"row_heads": self._decode_rows.last_row_heads, "calls": self._decode_calls[1]},
        )

    def bind_graph_state(self, kept) -> None:
        self._decode_rows.expect(self.handle.controller.layout, kept.per_step["row_heads"])
        self._decode_calls = (-1, kept.per_step["calls"])

    def replayed(self, n: int) -> None:
        self._decode_rows.repeat_last_forward(n)
        self._calls += self._decode_calls[1] * n

    def stats(self) -> dict[str, Any]:
        rows = int(self._rows) + self._decode_rows.total()
        return {"layers": sorted(self.layers), "rows_touched": rows, "calls_edited": self._calls}
