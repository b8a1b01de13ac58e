"""AGLA: Assembly of Global and Local Attention (An et al., 2024, arXiv:2406.12718).

AGLA adds to the model's logits on the original image ("global" features, for generation)
its logits on an *augmented view* in which only the prompt-relevant parts of the image are
kept ("local" features, for discrimination): ``l + alpha * l_aug``, ``-inf`` where
``p < beta * max p`` (released LLaVA-1.5 POPE script: ``alpha=2``, ``beta=0.5``; the
released code samples with temperature 1, top-p 1).

The released code (github.com/Lackel/AGLA, ``eval/augmentation.py``) builds the augmented
view with an external image-text matching model: the GradCAM of BLIP-ITM (large, block 6)
for the prompt over its 24x24 patch grid, blurred and upsampled to 384x384 pixels; its
image-text contrastive score ``s`` sets the share of pixels kept (``1 - ratio`` with
``ratio = 1 - s / 2``, i.e. ``s / 2``); all other pixels are set to 0 before the image is
preprocessed again.

BLIP-ITM is not available offline, so vlmfix builds the view on its own terms (deliberate
deviations):

* **Relevance from the model's own attention.** One probe forward of the main rows before
  the prefill (as for AvisC) measures, per layer, the head-averaged attention of the last
  prompt token on every image token (:class:`~vlmfix.plan.RowStats`, unedited scores);
  the relevance of an image token is its mean over all layers. No GradCAM, no blur.
* **A fixed share of image tokens is kept** (``keep``, default 0.25, the most relevant
  per sample; at least one) instead of the ITC-dependent ``s / 2`` share of pixels.
  0.25 is vlmfix's choice, not a paper value.
* **Token-level masking.** The augmented row is the main row with the LM input
  embeddings of the other image tokens set to 0 (with any-res models the base grid, the
  any-res grid and the ``image_newline`` tokens are ranked together), instead of black
  pixels re-encoded by the vision tower.

The augmented view is a contrast-branch row of the same batch, so a decode step stays one
forward; the probe forward costs about one more main-row prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmfix.branches import BranchSpec, plausible
from vlmfix.errors import StateError
from vlmfix.methods import register
from vlmfix.methods._attn_utils import probe_attention, probing_prefill
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["AGLA", "agla_keep_mask"]


def agla_keep_mask(relevance: torch.Tensor, image: torch.Tensor, keep: float) -> torch.Tensor:
    """Bool ``[B, L]``: per sample the ``max(1, ceil(keep * n_image))`` image tokens of
    highest ``relevance`` (ties: lower position first).

    Args:
        relevance: fp32 ``[B, L]`` relevance per position (read on image positions only).
        image: bool ``[B, L]`` image positions.
        keep: share of image tokens to keep, in (0, 1].
    """
    n = image.sum(-1)  # [B]
    k = torch.clamp((n.double() * keep).ceil().long(), min=1)
    score = relevance.float().masked_fill(~image, float("-inf"))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return image & (rank < k[:, None])


@register
@dataclass(frozen=True)
class AGLA(MethodConfig):
    """Assembly of Global and Local Attention: add the logits of an augmented view that
    keeps only the prompt-relevant image tokens (relevance from the model's own attention;
    see the module docstring for the deviations from the BLIP-based released code)."""

    name: ClassVar[str] = "agla"
    order: ClassVar[int] = 300
    paper: ClassVar[str] = "An et al., AGLA: Assembly of Global and Local Attention (arXiv:2406.12718)"

    alpha: float = help_field(2.0, "weight of the augmented view: l + alpha * l_aug (released LLaVA script: 2)")
    beta: float = help_field(0.5, "plausibility cutoff: keep tokens with p >= beta * max p (released: 0.5)")
    keep: float = help_field(0.25, "share of image tokens kept in the augmented view (vlmfix's choice; no BLIP ITC)")

    def __post_init__(self):
        self._check(self.alpha >= 0, "alpha", ">= 0")
        self._check(0 <= self.beta < 1, "beta", "in [0, 1)")
        self._check(0 < self.keep <= 1, "keep", "in (0, 1]")

    def build(self) -> Method:
        return AGLAMethod(self)


class AGLAMethod(Method):
    def __init__(self, config: AGLA):
        super().__init__(config)
        self._attn: list[torch.Tensor] = []
        self._image: torch.Tensor | None = None
        self._zero: torch.Tensor | None = None
        self._stats: dict = {}

    def branches(self) -> tuple[BranchSpec, ...]:
        self._attn.clear()
        self._image = self._zero = None
        return (BranchSpec("augmented_view", embeds=self._mask_embeds, probe=True),)

    def wants_row_stats(self, call) -> bool:
        return probing_prefill(call)

    def observe(self, call, plan, result) -> None:
        if result.row_stats is None or not probing_prefill(call):
            return
        probs, image = probe_attention(call, result)
        self._image = image
        self._attn.append(probs)  # [B, Tk], head-averaged

    def _masked(self) -> torch.Tensor:
        """Bool ``[B, L]``: image tokens hidden in the augmented view."""
        if not self._attn or self._image is None:
            raise StateError(
                "agla: no attention statistics were recorded at the probe forward; AGLA needs "
                "vlmfix.generate and image tokens in every prompt"
            )
        dev = self._image.device  # layers may sit on several devices (device_map)
        relevance = torch.stack([a.to(dev) for a in self._attn]).mean(0)
        kept = agla_keep_mask(relevance, self._image, self.config.keep)
        self._stats = {"kept_tokens": kept.sum(-1).tolist(), "image_tokens": self._image.sum(-1).tolist()}
        return self._image & ~kept

    def _mask_embeds(self, embeds: torch.Tensor, prompt_length: int) -> torch.Tensor:
        if self._zero is None:
            self._zero = self._masked()
        zero = self._zero.to(embeds.device)
        zero = torch.nn.functional.pad(zero, (0, embeds.shape[1] - zero.shape[1]), value=False)
        return embeds.masked_fill(zero[:, :, None], 0)

    def combine(self, step, logits, branch_logits):
        cfg = self.config
        out = logits + cfg.alpha * branch_logits[0].float()
        return out.masked_fill(~plausible(logits, cfg.beta), float("-inf"))

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)
