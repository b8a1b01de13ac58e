"""ONLY: One-Layer Intervention (Wan et al., ICCV 2025, arXiv:2507.00898).

ONLY contrasts the model's logits with those of a *textually enhanced* branch that costs
one layer's worth of extra work, not a second forward. Facts from the released code
(github.com/zifuwan/ONLY, ``modeling_llama.py`` and ``only_sample.py``), in vlmfix terms:

1. **The intervention layer** ``l`` (``enhance_layer_index``, 0 in the released scripts).
   Take the last query row's attention probabilities ``a[h, j]`` (softmax of the unedited
   scores). Text keys are the prompt/generated text keys except the first key of the
   sequence (BOS), image keys are the image tokens. Within each set, per head, zero the
   keys with ``a > mean + std`` (unbiased std over the set); the first key keeps its
   weight. From the clipped weights normalised within each set, per head the entropy
   ``H = -sum p log(p + 1e-6)`` of text and of image (an empty set: text 0, image inf),
   and the *text-to-visual entropy ratio* ``r_h = H_text / H_image``. Heads with
   ``r_h < mean_h r`` are dropped (all weights 0). The branch's attention output is
   ``o_proj(sum_j a'[h, j] v[h, j])`` — no softmax renormalisation.
2. **The last layer.** The branch state ``c`` (that attention output, carried unchanged
   through the layers in between) is merged into the main stream's input ``x`` of the
   last decoder layer: ``u = input_layernorm(c) + 0.2 x``, ``u = u + mlp(post_attention_
   layernorm(u))``; ``l_cd = lm_head(norm(u))``.
3. **The combination** (per sample), with ``p``, ``p_cd`` the softmaxes:
   ``tvd = sum |p - p_cd|``; if ``tvd < gamma``: ``l + alpha_pos * l_cd`` (the branches
   agree: reinforce), else ``(1 + alpha_neg) l - alpha_neg l_cd`` (contrast); tokens with
   ``p < beta max p`` get ``-inf``.

vlmfix runs step 1 inside the same attention call (from :class:`~vlmfix.plan.RowStats`
and :meth:`~vlmfix.attention.AttentionCall.row_output`, no score matrix), step 2 as one
extra MLP on the last position of each row, so a decode step stays one model forward.

Deviations: text/image key sets come from the batch layout instead of the hard-coded
``1..35`` / ``35..611`` spans of LLaVA-1.5 (so padding, LLaVA-NeXT and OneVision work; the
"first key" is the first non-pad key, which is BOS for LLaMA prompts and the template's
first token for Qwen2); the "last layer" is the model's last decoder layer (31 in the
released code); probabilities are fp32 (the released code casts them to fp16); the total
variation is per sample (the released code sums over its batch of one). The released
scripts sample (temperature 1, top-p 1); greedy works too. With other contrastive methods
ONLY acts first: their contrast is taken against ONLY's output on the main rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmfix.branches import plausible
from vlmfix.layout import Label
from vlmfix.methods import register
from vlmfix.methods._attn_utils import accumulate
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["ONLY", "only_branch_weights"]


def _clip_outliers(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``probs`` on ``keys`` (bool ``[B, Tk]``) with values above mean + std (unbiased, per
    head, over ``keys``) set to 0; 0 outside ``keys``."""
    m = keys[:, None, :].to(probs.dtype)
    n = m.sum(-1, keepdim=True)
    mean = (probs * m).sum(-1, keepdim=True) / n
    std = (((probs - mean) ** 2 * m).sum(-1, keepdim=True) / (n - 1)).sqrt()
    return torch.where(probs > mean + std, 0.0, probs) * m


def _entropy(weights: torch.Tensor, empty: float) -> torch.Tensor:
    """Entropy ``[B, H]`` of ``weights`` normalised over the last axis (``empty`` where all 0)."""
    p = weights / weights.sum(-1, keepdim=True)
    return torch.nan_to_num(-(p * torch.log(p + 1e-6)).sum(-1), nan=empty)


def only_branch_weights(probs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ONLY's edited last-row attention weights (step 1 of the module docstring).

    Args:
        probs: fp32 ``[B, H, Tk]``, the last row's attention probabilities.
        labels: int8 ``[B, Tk]`` key labels; positions: long ``[B, Tk]``.

    Returns:
        fp32 ``[B, H, Tk]``: clipped text and image weights, the first key unchanged, the
        heads whose text-to-visual entropy ratio is below the mean zeroed.
    """
    real = labels != Label.PAD
    first = real & (positions == 0)
    text = ((labels == Label.TEXT) | (labels == Label.TEXT_SINK)) & ~first
    image = (labels == Label.IMAGE) | (labels == Label.IMAGE_SINK)
    t, i = _clip_outliers(probs, text), _clip_outliers(probs, image)
    ratio = _entropy(t, 0.0) / _entropy(i, math.inf)  # [B, H]
    keep = ~(ratio < ratio.mean(-1, keepdim=True))
    return (t + i + probs * first[:, None, :]) * keep[..., None]


@register
@dataclass(frozen=True)
class ONLY(MethodConfig):
    """One-layer intervention: contrast (or reinforce) with a text-enhanced branch
    computed inside the same forward.

    Defaults are the released POPE script's (``js_gamma=0.2``); the CHAIR script uses
    ``gamma=0.25`` (preset ``vlmfix/configs/methods/only_chair.yaml``).
    """

    name: ClassVar[str] = "only"
    order: ClassVar[int] = 290
    paper: ClassVar[str] = "Wan et al., ONLY: One-Layer Intervention..., ICCV 2025 (arXiv:2507.00898)"

    layer: int = help_field(0, "intervention layer (released enhance_layer_index=0)")
    alpha_pos: float = help_field(3.0, "when the branches agree (tvd < gamma): l + alpha_pos * l_cd")
    alpha_neg: float = help_field(1.0, "otherwise: (1 + alpha_neg) * l - alpha_neg * l_cd")
    gamma: float = help_field(0.2, "total-variation threshold sum|p - p_cd| (POPE 0.2, CHAIR 0.25)")
    beta: float = help_field(0.1, "plausibility cutoff: keep tokens with p >= beta * max p (0 keeps all)")
    residual_scale: float = help_field(0.2, "weight of the main stream's last-layer input in the branch")

    def __post_init__(self):
        self._check(isinstance(self.layer, int) and self.layer >= 0, "layer", "an int >= 0")
        self._check(self.alpha_pos >= 0, "alpha_pos", ">= 0")
        self._check(self.alpha_neg >= 0, "alpha_neg", ">= 0")
        self._check(0 <= self.gamma <= 2, "gamma", "in [0, 2] (a total variation sum|p - q|)")
        self._check(0 <= self.beta < 1, "beta", "in [0, 1)")

    def build(self) -> Method:
        return ONLYMethod(self)


class ONLYMethod(Method):
    def __init__(self, config: ONLY):
        super().__init__(config)
        self._branch: torch.Tensor | None = None  # [R, E]: branch attention output, last row
        self._last_input: torch.Tensor | None = None  # [R, E]: main input of the last layer
        self._steps = 0
        self._agree = 0

    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        n = handle.controller.num_layers
        if self.config.layer >= n - 1:
            from vlmfix.errors import ConfigError

            raise ConfigError(f"only: layer={self.config.layer} must be below the last decoder layer ({n - 1})")
        self._layers = handle.adapter.decoder_layers(handle.model)
        last = self._layers[n - 1]
        handle.add_hook(last.register_forward_pre_hook(self._capture_last_input, with_kwargs=True))

    def _capture_last_input(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is not None:
            self._last_input = x[:, -1]
        return None

    def wants_row_stats(self, call) -> bool:
        rows = call.controller.rows
        return call.layer_idx == self.config.layer and rows is not None and not rows.probing

    def observe(self, call, plan, result) -> None:
        if result.row_stats is None or not self.wants_row_stats(call):
            return
        layout = call.layout
        weights = only_branch_weights(result.row_stats.probs, layout.labels, layout.positions)
        out = call.row_output(weights)  # [B, H, D]
        o_proj = self._layers[call.layer_idx].self_attn.o_proj
        self._branch = o_proj(out.reshape(out.shape[0], -1).to(o_proj.weight.dtype))

    def branch_logits(self, rows: int) -> torch.Tensor:
        """fp32 ``[rows, V]``: the branch's next-token logits of the first ``rows`` rows."""
        if self._branch is None or self._last_input is None:
            from vlmfix.errors import StateError

            raise StateError("only: the branch was not computed in this forward; ONLY needs vlmfix.generate")
        model, adapter = self.handle.model, self.handle.adapter
        last = self._layers[-1]
        u = last.input_layernorm(self._branch[:rows]) + self.config.residual_scale * self._last_input[:rows]
        u = u + last.mlp(last.post_attention_layernorm(u))
        norm = adapter.get(model, "language_model").norm
        return adapter.get(model, "lm_head")(norm(u)).float()

    def process_logits(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        cd = self.branch_logits(logits.shape[0])
        tvd = (logits.softmax(-1) - cd.softmax(-1)).abs().sum(-1, keepdim=True)
        agree = tvd < cfg.gamma
        out = torch.where(agree, logits + cfg.alpha_pos * cd, (1 + cfg.alpha_neg) * logits - cfg.alpha_neg * cd)
        self._steps = self._steps + logits.shape[0]
        self._last_rows = logits.shape[0]
        self._agree = accumulate(self._agree, agree.sum())  # device counter, read in stats()
        return out.masked_fill(~plausible(logits, cfg.beta), float("-inf"))

    def replayed(self, n: int) -> None:
        self._steps += self._last_rows * n

    def stats(self) -> dict[str, Any]:
        steps = int(self._steps)
        agree = int(self._agree)
        return {"row_steps": steps, "agreeing_fraction": agree / steps if steps else 0.0}
