"""Attention plans: what one attention call must do, as tensors.

Attention methods never see a score matrix. For every attention call (one decoder layer,
one forward) the :class:`~vlmfix.attention.Controller` starts a plan from the layer's
token map (key labels and positions, query positions), asks each attached method to
*contribute* to it, and hands it to a backend (``reference``: pure torch; ``triton``:
fused kernels) that executes it in one pass. See ``docs/plans.md``.

A plan holds, for a call with queries ``[B, H, Tq, D]`` and keys ``[B, Hkv, Tk, D]``:

* ``labels`` int8 ``[B, Tk]``: a :class:`~vlmfix.layout.Label` per key (TEXT, TEXT_SINK,
  IMAGE, IMAGE_SINK, PAD). Sink labels are per-layer overlays (VAR sets them).
* ``q_pos`` / ``k_pos`` long ``[B, Tq]`` / ``[B, Tk]``: token positions. Key ``j`` is visible
  to query ``i`` iff ``labels[j] != PAD and k_pos[j] <= q_pos[i]``.
* pre-softmax edit: ``z_ij <- z_ij + c_bhj * |z_ij|`` in the rows ``score_rows`` (bool
  ``[B, Tq]``; None = every row) with ``score_coef`` fp32 ``[B, H or 1, Tk]`` (PAI, PAINT).
* post-softmax reweighting (VAR): :class:`Reweight`.
* ``head_scale`` fp32 ``[B, H]``: multiplies each head's output (VHR).
* ``want_row_stats``: a method asked for :class:`RowStats` of the last query row; they are
  measured before any edit (``call.row_stats``) and reported in :class:`PlanResult`.

Composition (the order is fixed, whatever order methods were attached in):

1. Measurements (:class:`RowStats`) are taken on the *unedited* scores of the call.
2. Pre-softmax edits compose additively: two edits with coefficients ``c1`` and ``c2`` give
   ``z + (c1 + c2) |z|`` (both computed from the same unedited ``|z|``), so their order does
   not matter. Edits must share the row set: vlmfix's edit rows are "the last prompt row
   and every generated row" (:attr:`AttentionPlan.score_rows`).
3. Softmax over the visible keys.
4. Post-softmax reweighting reads the segment masses of the *edited* distribution.
5. Head scales multiply the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionPlan", "Reweight", "RowStats", "PlanResult", "PlanError"]


class PlanError(ValueError):
    """Two contributions to one plan cannot be composed."""


@dataclass
class Reweight:
    """Move attention mass from visual sinks to the other image keys (VAR).

    Per (sample, head, query row) with masses of the edited distribution ``P_img`` (IMAGE +
    IMAGE_SINK keys), ``P_sink`` (IMAGE_SINK) and ``P_rest = P_img - P_sink``, a row is
    *selected* iff ``rows[b, i]``, ``P_img >= min_mass``, ``P_sink > 0``,
    ``P_sink <= rho * P_img`` and ``P_rest > 0``. In a selected row sink probabilities are
    multiplied by ``p`` and the other image keys' by ``1 + (1 - p) P_sink / P_rest``; the
    row still sums to one.

    Attributes:
        rows: bool ``[B, Tq]``, rows eligible for reweighting.
        p, rho, min_mass: the rule's constants.
        weights: optional fp32 ``[B, 1, Tk, 2]``, per key (is image, is image sink), the
            same information as the plan's labels, prepared once per sequence so a decode
            step need not rebuild it.
    """

    rows: torch.Tensor
    p: float
    rho: float
    min_mass: float
    weights: torch.Tensor | None = None


@dataclass
class RowStats:
    """Statistics of the last query row of a call, on the unedited scores.

    Attributes:
        probs: fp32 ``[B, H, Tk]``, per-key probabilities (0 at invisible keys).
        out: fp32 ``[B, H, D]``, the row's attention output.
        out_text: fp32 ``[B, H, D]``, the output with only text keys visible (zeros where a
            row sees no text key).
    """

    probs: torch.Tensor
    out: torch.Tensor
    out_text: torch.Tensor


@dataclass
class PlanResult:
    """What a backend returns besides the attention output.

    Attributes:
        selected: bool ``[B, H, Tq]``, the rows a :class:`Reweight` changed (None without one).
        row_stats: the requested :class:`RowStats` (None when not requested).
    """

    selected: torch.Tensor | None = None
    row_stats: RowStats | None = None


@dataclass
class AttentionPlan:
    """One attention call's edits and requests (see the module docstring).

    Attributes:
        layer: decoder layer index.
        labels: int8 ``[B, Tk]``.
        q_pos: long ``[B, Tq]``.
        k_pos: long ``[B, Tk]``.
        plain_causal: host-side: no padding and keys ``0..Tk-1`` in order, so plain
            attention may take a flash kernel.
        mask: the visible mask ``[B or 1, 1, Tq, Tk]`` built once per forward from positions
            (None when plain causal attention needs none).
        custom_mask: ``mask`` is a custom 4D mask passed by the caller, which overrides
            positions (the Triton backend then defers to the reference backend).
        score_rows: bool ``[B, Tq]`` rows of the pre-softmax edit; None = every row.
        score_coef: fp32 ``[B, H or 1, Tk]`` or None.
        reweight: a :class:`Reweight` or None.
        head_scale: fp32 ``[B, H]`` or None.
        want_row_stats: a method asked for :class:`RowStats` of the last query row (the
            controller measures them before the edits; backends do not read this flag).
    """

    layer: int
    labels: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    plain_causal: bool = False
    mask: torch.Tensor | None = None
    custom_mask: bool = False
    score_rows: torch.Tensor | None = None
    score_coef: torch.Tensor | None = None
    reweight: Reweight | None = None
    head_scale: torch.Tensor | None = None
    want_row_stats: bool = False

    @property
    def edits(self) -> bool:
        """Whether the plan changes the attention output."""
        return self.score_coef is not None or self.reweight is not None or self.head_scale is not None

    def add_score_edit(self, coef: torch.Tensor) -> None:
        """Add a pre-softmax edit ``z + coef * |z|`` (``coef`` fp32 ``[B, H or 1, Tk]``) in
        :attr:`score_rows`; edits compose additively."""
        self.score_coef = coef if self.score_coef is None else self.score_coef + coef

    def set_reweight(self, reweight: Reweight) -> None:
        if self.reweight is not None:
            raise PlanError(f"layer {self.layer}: two post-softmax reweightings in one plan are not supported")
        self.reweight = reweight

    def scale_heads(self, scale: torch.Tensor) -> None:
        """Multiply head outputs by ``scale`` fp32 ``[B, H]`` (scales compose by product)."""
        self.head_scale = scale if self.head_scale is None else self.head_scale * scale
