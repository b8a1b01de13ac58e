"""HELPD vision-enhanced penalty decoding (Yuan et al., EMNLP 2024, arXiv:2409.20429).

HELPD has two halves: hierarchical feedback *learning* (object- and sentence-level
feedback during fine-tuning) and vision-enhanced penalty *decoding*. Only the decoding half
is in vlmfix; the training half is out of scope.

What can be read: the paper describes the decoding as OPERA's over-trust penalty (Huang et
al., CVPR 2024) computed on the generated text's attention window, combined by weights
with a penalty from a *visual* attention window, the total subtracted from the scores of
beam search (the paper compares it with beam 5 and OPERA). The released repository
(github.com/F-Yuan303/HELPD) holds the training code; its evaluation scripts call an
OPERA-style ``generate(opera_decoding=True, scale_factor=50, threshold=15,
num_attn_candidates=5, penalty_weights=1.0, num_beams=5)`` whose implementation is not
released. The OPERA facts used here are from OPERA's released ``generate``: the last
layer's attention, max over heads, rows renormalised; the local window of generated tokens
scaled by ``sigma = 50``; column score ``phi_j = 1e-7 * prod_{i >= j} sigma w[i, j]``; the
over-trust penalty is ``max_j phi_j``, or, while at most 10 tokens are generated, minus
the last row's attention mass on the image.

vlmfix's penalty of a running beam, from the attention row of its newest token (one
forward per step, :class:`~vlmfix.plan.RowStats` of the last layer):

    penalty = penalty_weight * (max_j phi_j if n > early else -m_img) - vision_weight * m_img

with ``n`` generated tokens and ``m_img`` the newest row's (renormalised, max-over-heads)
attention mass on image tokens: the visual window rewards beams that keep looking at the
image. The penalty is subtracted from the accumulated score of all continuations of the
beam (:meth:`~vlmfix.methods.Method.beam_penalty`), so it is part of the beam scores.

Deviations (the exact visual-window formula of HELPD is not public): the visual term is
OPERA's own image-attention score, weighted by ``vision_weight`` (1.0, vlmfix's choice);
OPERA scores each of the top ``num_attn_candidates`` tokens of a beam with an extra
forward that includes the candidate, vlmfix scores the candidate one step later, in the
forward that feeds it (no extra forwards; the penalty then ranks the beams instead of the
siblings of one beam); OPERA's retrospection-allocation rollback (``threshold``) is not
implemented. Penalties act only in beam search (``num_beams > 1``): a constant per row
changes no greedy choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmfix.methods import register
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["HELPD", "over_trust_score"]


def over_trust_score(window: torch.Tensor, scale: float) -> torch.Tensor:
    """OPERA's over-trust score of a local attention window.

    Args:
        window: fp32 ``[R, n, n]``, row ``i`` = attention of generated token ``i`` on the
            generated tokens (lower triangle used).
        scale: ``sigma``.

    Returns:
        fp32 ``[R]``: ``max_j 1e-7 * prod_{i >= j} sigma * window[i, j]``.
    """
    n = window.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool, device=window.device).tril()
    factors = torch.where(below, scale * window, 1.0)
    return 1e-7 * factors.prod(dim=-2).amax(-1)


@register
@dataclass(frozen=True)
class HELPD(MethodConfig):
    """Vision-enhanced penalty decoding (the decoding half of HELPD) for beam search."""

    name: ClassVar[str] = "helpd"
    order: ClassVar[int] = 400
    paper: ClassVar[str] = "Yuan et al., HELPD, EMNLP 2024 (arXiv:2409.20429); OPERA, CVPR 2024"

    penalty_weight: float = help_field(1.0, "weight of the over-trust (text window) penalty (released: 1.0)")
    vision_weight: float = help_field(1.0, "weight of the visual-window term -m_img (vlmfix's choice)")
    scale: float = help_field(50.0, "sigma: scale of the attention window before the column products (OPERA: 50)")
    early: int = help_field(10, "up to this many generated tokens the text term is -m_img (OPERA: 10)")

    def __post_init__(self):
        self._check(self.penalty_weight >= 0, "penalty_weight", ">= 0")
        self._check(self.vision_weight >= 0, "vision_weight", ">= 0")
        self._check(self.scale > 0, "scale", "> 0")
        self._check(isinstance(self.early, int) and self.early >= 0, "early", "an int >= 0")

    def build(self) -> Method:
        return HELPDMethod(self)


class HELPDMethod(Method):
    def __init__(self, config: HELPD):
        super().__init__(config)
        self._reset()
        self._steps = 0

    def _reset(self) -> None:
        self._prompt = None  # keys before the first generated token (host int)
        self._window: torch.Tensor | None = None  # [R, T, T]
        self._penalty: torch.Tensor | None = None
        self._penalty_step = -1

    def branches(self):
        self._reset()  # called once per vlmfix.generate: a new batch of sequences
        return ()

    def wants_row_stats(self, call) -> bool:
        rows = call.controller.rows
        return rows is not None and not rows.probing and call.layer_idx == call.controller.num_layers - 1

    def observe(self, call, plan, result) -> None:
        if result.row_stats is None or not self.wants_row_stats(call):
            return
        if call.controller.static is not None:
            # the static decode path serves greedy / sampled decoding only, where the
            # penalty (a beam score term) is never read
            return
        if self._prompt is None:
            self._prompt = call.k_len
            R, T = call.layout.batch_size, call.controller.decode_capacity
            self._window = torch.zeros(R, T, T, device=result.row_stats.probs.device)
        g = call.k_len - self._prompt - 1  # index of the generated token whose row this is
        if g < 0:
            return
        cfg = self.config
        w = result.row_stats.probs.amax(1)  # [R, Tk], max over heads
        w = w / w.sum(-1, keepdim=True)
        self._window[:, g, : g + 1] = w[:, self._prompt : self._prompt + g + 1]
        image_mass = (w * call.layout.image_mask).sum(-1)
        if g + 1 > cfg.early:
            text = over_trust_score(self._window[:, : g + 1, : g + 1], cfg.scale)
        else:
            text = -image_mass
        self._penalty = cfg.penalty_weight * text - cfg.vision_weight * image_mass
        self._penalty_step = g + 1

    def reorder_rows(self, index: torch.Tensor) -> None:
        if self._window is not None:
            self._window = self._window.index_select(0, index)

    def beam_penalty(self, step: int) -> torch.Tensor | None:
        if self._penalty is None or self._penalty_step != step:
            return None
        self._steps += 1
        return self._penalty[: self.handle.controller.rows.num_samples]

    def stats(self) -> dict[str, Any]:
        return {"penalized_steps": self._steps}
