"""RBD: Re-Balancing Contrastive Decoding (Liang et al., 2024, arXiv:2409.06485).

Neither the paper's method section nor released code could be read for vlmfix; this is
the method as its abstract states it, on vlmfix's terms, with every choice named in
``docs/methods.md``. Two contrast rows per sample:

* the **textual branch** sees the image with diffusion noise (VCD's schedule), which
  makes the model lean on the text: its logits ``l_t`` carry the textual bias;
* the **visual branch** sees the real image, with its attention re-balanced towards the
  *significant* image tokens (the image tokens the last prompt token attends to most,
  summed over layers and averaged over heads, measured once per sequence in a probe
  forward of the main rows): ``z <- z + gamma_attn * |z|`` on those keys before the
  softmax, every query row of the branch, layers ``start_layer..``; its logits ``l_v``
  carry the enhanced visual evidence.

The main-row logits ``l`` become ``l + alpha (l - l_t) + gamma (l_v - l)``, ``-inf`` where
``p < beta * max p``: the textual bias is subtracted and the visual evidence added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.branches import BranchSpec, plausible
from vlmfix.errors import StateError
from vlmfix.methods import register
from vlmfix.methods._attn_utils import check_layer_fields, layer_set, probe_attention, probing_prefill
from vlmfix.methods.base import Method, MethodConfig, help_field
from vlmfix.methods.vcd import diffusion_noise

__all__ = ["RBD"]


@register
@dataclass(frozen=True)
class RBD(MethodConfig):
    """Re-Balancing Contrastive Decoding: subtract a noised-image (textual) branch, add an
    attention-re-balanced (visual) branch.

    All numbers are vlmfix's choices (the paper's could not be read): the noise is VCD's,
    the attention edit is PAI's form restricted to the significant tokens.
    """

    name: ClassVar[str] = "rbd"
    order: ClassVar[int] = 300
    paper: ClassVar[str] = "https://arxiv.org/abs/2409.06485"

    alpha: float = help_field(1.0, "weight of the textual contrast: + alpha * (l - l_textual)")
    gamma: float = help_field(1.0, "weight of the visual branch: + gamma * (l_visual - l)")
    beta: float = help_field(0.1, "plausibility cutoff on the main logits (0 keeps all)")
    noise_step: int = help_field(500, "textual branch: diffusion step T of the noised image (of 1000)")
    significant_ratio: float = help_field(0.1, "visual branch: share of image tokens that are significant")
    gamma_attn: float = help_field(0.5, "visual branch: z + gamma_attn * |z| on significant keys before the softmax")
    start_layer: int = help_field(2, "first layer edited in the visual branch")
    end_layer: int = help_field(0, "one past the last edited layer; <= 0 counts from the depth (0 = last layer)")
    layers: tuple[int, ...] = help_field((), "explicit edited layers (overrides start_layer/end_layer)")

    def __post_init__(self):
        self._check(self.alpha >= 0, "alpha", ">= 0")
        self._check(self.gamma >= 0, "gamma", ">= 0")
        self._check(0 <= self.beta < 1, "beta", "in [0, 1)")
        self._check(0 <= self.noise_step < 1000, "noise_step", "in [0, 1000)")
        self._check(0 < self.significant_ratio <= 1, "significant_ratio", "in (0, 1]")
        self._check(self.gamma_attn >= 0, "gamma_attn", ">= 0")
        check_layer_fields(self)

    def build(self) -> Method:
        return RBDMethod(self)


class RBDMethod(Method):
    def __init__(self, config: RBD):
        super().__init__(config)
        self._layers: frozenset[int] = frozenset()
        self._attn: torch.Tensor | None = None  # [B, L] summed last-row attention on image keys
        self._image: torch.Tensor | None = None
        self._significant: torch.Tensor | None = None
        self._coef: torch.Tensor | None = None  # [rows, 1, capacity] pre-softmax coefficients
        self._stats: dict = {}

    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        cfg = self.config
        depth = len(handle.adapter.decoder_layers(handle.model))
        self._layers = layer_set(cfg.layers, cfg.start_layer, cfg.end_layer, depth, cfg.name)

    def branches(self) -> tuple[BranchSpec, ...]:
        self._attn = self._image = self._significant = self._coef = None
        step = self.config.noise_step
        return (
            BranchSpec("textual", pixels=lambda px, g: diffusion_noise(px, step, g)),
            BranchSpec("visual", probe=True),
        )

    def wants_row_stats(self, call) -> bool:
        return probing_prefill(call)

    def observe(self, call, plan, result) -> None:
        if result.row_stats is None or not probing_prefill(call):
            return
        probs, image = probe_attention(call, result)
        self._image = image
        self._attn = probs * image if self._attn is None else self._attn + probs * image

    def _select(self) -> torch.Tensor:
        """Bool ``[B, L]``: the significant image tokens of each sample."""
        if self._attn is None:
            raise StateError(
                "rbd: no attention was recorded at the probe forward; RBD needs vlmfix.generate and image "
                "tokens in every prompt"
            )
        ratio = self.config.significant_ratio
        out = torch.zeros_like(self._image)
        counts = []
        for b in range(out.shape[0]):  # once per sequence
            n_image = int(self._image[b].sum())
            n = min(n_image, math.ceil(ratio * n_image))
            if n:
                top = self._attn[b].masked_fill(~self._image[b], float("-inf")).topk(n).indices
                out[b, top] = True
            counts.append(n)
        self._stats = {"significant_tokens": counts}
        return out

    def contribute(self, call, plan) -> None:
        rows = call.controller.rows
        if rows is None or rows.probing or call.layer_idx not in self._layers or self.config.gamma_attn == 0:
            return
        if self._coef is None or self._coef.shape[-1] < call.k_len:
            # once per sequence: gamma on the significant image keys of the visual branch rows,
            # over the layout's whole capacity (a decode step only takes a view)
            if self._significant is None:
                self._significant = self._select()
            sig = self._significant
            cap = max(call.layout.capacity, call.k_len)
            keys = torch.zeros(rows.num_rows, cap, dtype=torch.bool, device=sig.device)
            k = rows.branches.index((self.name, "visual"))
            keys[rows.branch_rows(k), : sig.shape[1]] = sig
            self._coef = (keys.float() * float(self.config.gamma_attn))[:, None, :]
        # every row of the branch; with PAI/PAINT attached, their edit rows apply to all edits
        plan.add_score_edit(self._coef[:, :, : call.k_len])

    def combine(self, step, logits, branch_logits):
        cfg = self.config
        textual, visual = branch_logits[0].float(), branch_logits[1].float()
        out = logits + cfg.alpha * (logits - textual) + cfg.gamma * (visual - logits)
        return out.masked_fill(~plausible(logits, cfg.beta), float("-inf"))

    def stats(self):
        return dict(self._stats)
