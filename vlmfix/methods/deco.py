"""DeCo: Dynamic Correction Decoding (Wang et al., ICLR 2025, arXiv:2410.11779).

MLLMs often still "see" an object in a preceding layer although the final layer's
language prior overrides it. At every step DeCo

1. takes the candidate tokens of the final layer: the ``top_k`` most likely, cut to the
   smallest prefix whose probability mass reaches ``top_p``;
2. computes early-exit distributions ``softmax(lm_head(norm(h_l)))`` of the candidate
   layers ``l`` and picks, per sample, the layer holding the largest probability of any
   candidate, ``p* = max_{l, c} p_l(c)``;
3. returns ``l_final + alpha * p* * l_selected`` on the candidates and ``-inf`` elsewhere.

The hidden states come from the same forward as the final logits (scoped hooks on the
decoder layers): one forward per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.methods import register
from vlmfix.methods._hidden import LayerOutputs, depth_scaled_layers, early_exit_logits
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["DeCo", "deco_correct"]


def deco_correct(
    logits: torch.Tensor, early: torch.Tensor, alpha: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeCo's correction of one step's logits, per row.

    Args:
        logits: ``[B, V]`` fp32 final-layer logits.
        early: ``[N, B, V]`` fp32 early-exit logits of the ``N`` candidate layers.
        alpha: correction strength.
        top_k, top_p: candidate tokens = the ``top_k`` most likely, cut to the smallest
            prefix whose cumulative probability is ``>= top_p``.

    Returns:
        ``(corrected logits [B, V], index of the selected layer in early [B])``.
    """
    k = min(top_k, logits.shape[-1])
    cand_p, cand_ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)  # [B, k]
    # smallest prefix with cumulative mass >= top_p (the released code's searchsorted + 1)
    n_keep = ((cand_p.cumsum(-1) < top_p).sum(-1) + 1).clamp(max=k)  # [B]
    keep = torch.arange(k, device=logits.device)[None, :] < n_keep[:, None]  # [B, k]
    early_p = torch.softmax(early, dim=-1)  # [N, B, V]
    at_cand = early_p.gather(-1, cand_ids[None].expand(early.shape[0], -1, -1))  # [N, B, k]
    at_cand = at_cand.masked_fill(~keep[None], -1.0).permute(1, 0, 2).flatten(1)  # [B, N * k], layer-major
    flat = at_cand.argmax(dim=-1)  # first maximum, as the released code's torch.argmax
    p_star = at_cand.gather(-1, flat[:, None]).squeeze(-1)
    layer = flat // k  # [B]
    selected = early[layer, torch.arange(early.shape[1], device=early.device)]  # [B, V]
    out = logits + alpha * p_star[:, None] * selected
    candidates = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, cand_ids, keep)
    return out.masked_fill(~candidates, float("-inf")), layer


@register
@dataclass(frozen=True)
class DeCo(MethodConfig):
    """Dynamic Correction Decoding: mix in the preceding layer that best sees a candidate.

    Layers are 0-based decoder-layer indices (the output of ``model.layers[i]``); the
    released code's ``early_exit_layers=range(20, 29)`` index transformers'
    ``hidden_states``, where index ``i`` is the output of decoder layer ``i - 1``, so they
    are decoder layers 19..27 here. The range is stated for a 32-layer LM and mapped to
    other depths by :func:`~vlmfix.methods._hidden.depth_scaled_layers`; ``layers``
    overrides it. Acts on the main rows' logits inside :func:`vlmfix.generate` after
    every contrastive method (it corrects the distribution the token is drawn from).
    """

    name: ClassVar[str] = "deco"
    order: ClassVar[int] = 310
    paper: ClassVar[str] = "https://arxiv.org/abs/2410.11779"

    alpha: float = help_field(0.6, "correction strength: l_final + alpha * p* * l_selected_layer")
    top_k: int = help_field(20, "at most this many candidate tokens (threshold_top_k)")
    top_p: float = help_field(0.9, "candidates: smallest top-k prefix with probability mass >= top_p (threshold_top_p)")
    start_layer: int = help_field(19, "first candidate layer (0-based decoder layer, for a 32-layer LM)")
    end_layer: int = help_field(28, "one past the last candidate layer (for a 32-layer LM)")
    layers: tuple[int, ...] = help_field(
        (), "explicit candidate layers (overrides start/end_layer; negative counts from the end)"
    )

    def __post_init__(self):
        self._check(self.alpha >= 0, "alpha", ">= 0")
        self._check(isinstance(self.top_k, int) and self.top_k >= 1, "top_k", "an int >= 1")
        self._check(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        self._check(isinstance(self.start_layer, int) and self.start_layer >= 0, "start_layer", "an int >= 0")
        self._check(isinstance(self.end_layer, int) and self.end_layer > self.start_layer, "end_layer", "> start_layer")
        self._check(
            isinstance(self.layers, tuple) and all(isinstance(i, int) for i in self.layers),
            "layers",
            "a tuple of ints, e.g. (19, 20, 21)",
        )

    def build(self) -> Method:
        return DeCoMethod(self)


class DeCoMethod(Method):
    def __init__(self, config: DeCo):
        super().__init__(config)
        self._outputs: LayerOutputs | None = None
        self._counts: torch.Tensor | None = None

    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        cfg = self.config
        depth = len(handle.adapter.decoder_layers(handle.model))
        layers = depth_scaled_layers(cfg.layers, cfg.start_layer, cfg.end_layer, depth, cfg.name)
        self._outputs = LayerOutputs(handle, layers)

    def on_detach(self) -> None:
        self._outputs = None
        super().on_detach()

    def process_logits(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        cfg, outputs = self.config, self._outputs
        main = slice(0, logits.shape[0])
        early = torch.stack([early_exit_logits(self.handle, outputs.last(i, main)) for i in outputs.layers])
        early = early.to(logits.device)  # the head's device, with a device_map
        out, layer = deco_correct(logits, early, cfg.alpha, cfg.top_k, cfg.top_p)
        # scatter_add, not bincount: bincount reads the maximum on the host (a sync)
        counts = torch.zeros(len(outputs.layers), dtype=torch.long, device=layer.device)
        counts.scatter_add_(0, layer, torch.ones_like(layer))
        self._counts = counts.clone() if self._counts is None else self._counts.add_(counts)
        outputs.clear()
        return out

    def stats(self):
        if self._counts is None or self._outputs is None:
            return {}
        return {"selected_layers": dict(zip(self._outputs.layers, self._counts.tolist()))}
