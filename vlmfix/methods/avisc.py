"""AvisC: Attentional Vision Calibration (Woo et al., 2024, arXiv:2405.17820).

At the prefill, AvisC measures how much the last prompt token attends to each image
token, finds the few "blind" tokens that soak up attention without carrying the object
evidence, and builds a contrast row that sees *only* those tokens (the other image
tokens' LM input embeddings are zeroed). Contrasting with it,
``(1 + alpha) l - alpha l'`` with the ``beta`` plausibility cutoff, removes what the
blind tokens alone would predict.

Blind tokens, per sample:

1. per layer, ``a_l[j]`` = head-averaged attention of the last prompt token on image
   token ``j`` (computed from that query's q and the keys, never a full attention matrix);
   ``m_l = sum_j a_l[j]``;
2. keep the fewest layers, highest ``m_l`` first, whose mass reaches ``layer_share`` (50%)
   of ``sum_l m_l``;
3. ``a = sum`` of ``a_l`` over the kept layers; blind = image tokens with
   ``a >= mean(a) + blind_std * std(a)`` (unbiased std, over the sample's image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.branches import BranchSpec, contrast
from vlmfix.errors import StateError
from vlmfix.methods import register
from vlmfix.methods._attn_utils import probe_attention, probing_prefill
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["AvisC"]


@register
@dataclass(frozen=True)
class AvisC(MethodConfig):
    """Attentional Vision Calibration: contrast with a row that sees only the blind tokens.

    The attention statistics come from one extra forward of the main rows before the
    prefill (the contrast row's embeddings depend on them), so the prefill costs about
    one more main-row prefill; decode steps stay one forward. The attention measured is
    the plain ``softmax(q k^T / sqrt(d))`` of the probe forward (edits of other attached
    attention methods are not included). With any-res models, ``image_newline`` positions
    count as image tokens.
    """

    name: ClassVar[str] = "avisc"
    order: ClassVar[int] = 300
    paper: ClassVar[str] = "https://arxiv.org/abs/2405.17820"

    layer_share: float = help_field(0.5, "keep the top layers holding this share of the image-attention mass")
    blind_std: float = help_field(1.0, "lambda: blind tokens have attention >= mean + lambda * std")
    alpha: float = help_field(1.0, "contrast strength: (1 + alpha) * l - alpha * l_blind")
    beta: float = help_field(0.1, "plausibility cutoff: keep tokens with p >= beta * max p (0 keeps all)")

    def __post_init__(self):
        self._check(0 < self.layer_share <= 1, "layer_share", "in (0, 1]")
        self._check(self.alpha >= 0, "alpha", ">= 0")
        self._check(0 <= self.beta < 1, "beta", "in [0, 1)")

    def build(self) -> Method:
        return AvisCMethod(self)


class AvisCMethod(Method):
    def __init__(self, config: AvisC):
        super().__init__(config)
        self._attn: dict[int, torch.Tensor] = {}
        self._image_mask: torch.Tensor | None = None
        self._zero: torch.Tensor | None = None
        self._stats: dict = {}

    def branches(self) -> tuple[BranchSpec, ...]:
        self._attn.clear()
        self._image_mask = self._zero = None
        return (BranchSpec("blind_tokens_only", embeds=self._mask_embeds, probe=True),)

    def wants_row_stats(self, call) -> bool:
        return probing_prefill(call)

    def observe(self, call, plan, result) -> None:
        if result.row_stats is None or not probing_prefill(call):
            return
        probs, image = probe_attention(call, result)
        self._image_mask = image
        self._attn[call.layer_idx] = probs * image

    def _blind(self) -> torch.Tensor:
        """Bool ``[B, L]``: image tokens to zero in the contrast row (the non-blind ones)."""
        if not self._attn or self._image_mask is None:
            raise StateError(
                "avisc: no attention statistics were recorded at the probe forward; AvisC needs "
                "vlmfix.generate and image tokens in every prompt"
            )
        cfg = self.config
        layers = sorted(self._attn)
        dev = self._image_mask.device  # layers may sit on several devices (device_map)
        per_layer = torch.stack([self._attn[i].to(dev) for i in layers])  # [layers, B, L]
        mass = per_layer.sum(-1)  # [layers, B]
        zero = torch.zeros_like(self._image_mask)
        kept_layers, n_blind = [], []
        for b in range(zero.shape[0]):
            image = self._image_mask[b]
            if not bool(image.any()):
                kept_layers.append([])
                n_blind.append(0)
                continue
            order = torch.argsort(mass[:, b], descending=True, stable=True)
            cum = mass[order, b].cumsum(0)
            n_keep = int((cum < cfg.layer_share * cum[-1]).sum()) + 1
            keep = order[:n_keep]
            attn = per_layer[keep, b].sum(0)[image]
            threshold = attn.mean() + cfg.blind_std * attn.std()
            blind = torch.zeros_like(image)
            blind[image] = attn >= threshold
            zero[b] = image & ~blind
            kept_layers.append(sorted(layers[i] for i in keep.tolist()))
            n_blind.append(int(blind.sum()))
        self._stats = {"layers": kept_layers, "blind_tokens": n_blind}
        return zero

    def _mask_embeds(self, embeds: torch.Tensor, prompt_length: int) -> torch.Tensor:
        if self._zero is None:
            self._zero = self._blind()
        zero = self._zero.to(embeds.device)
        zero = torch.nn.functional.pad(zero, (0, embeds.shape[1] - zero.shape[1]), value=False)
        return embeds.masked_fill(zero[:, :, None], 0)

    def combine(self, step, logits, branch_logits):
        return contrast(logits, branch_logits[0], self.config.alpha, self.config.beta)

    def stats(self):
        return dict(self._stats)
