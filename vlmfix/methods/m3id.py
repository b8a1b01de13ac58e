"""M3ID: Multi-Modal Mutual-Information Decoding (Favero et al., CVPR 2024, arXiv:2403.14003).

The unconditioned row sees the prompt without the image. With ``l_c`` / ``l_u`` the
log-probabilities with / without the image, the next-token scores are
``l_c + ((1 - gamma_t) / gamma_t) (l_c - l_u)`` with ``gamma_t = exp(-lambda t)``: the
correction grows as generation drifts away from the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.branches import BranchSpec
from vlmfix.methods import register
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["M3ID"]


@register
@dataclass(frozen=True)
class M3ID(MethodConfig):
    """M3ID: amplify the image's mutual information with the next token, more as ``t`` grows.

    ``t`` is the 1-based index of the token being generated (the first generated token
    has ``t = 1``), so every token, the first included, gets a correction; with
    ``t = 0`` first, ``gamma_0 = 1`` would leave one-word answers (POPE) untouched. The
    maths runs on log-softmax outputs (a per-row constant, so the token distribution is
    the same as on raw logits).
    """

    name: ClassVar[str] = "m3id"
    order: ClassVar[int] = 300
    paper: ClassVar[str] = "https://arxiv.org/abs/2403.14003"

    decay: float = help_field(0.02, "lambda of gamma_t = exp(-lambda * t): how fast the image's weight decays")

    def __post_init__(self):
        self._check(self.decay > 0, "decay", "> 0")

    def build(self) -> Method:
        return M3IDMethod(self)


class M3IDMethod(Method):
    graph_reusable = True  # stateless combine: a captured step serves later calls

    def branches(self) -> tuple[BranchSpec, ...]:
        return (BranchSpec("no_image", with_image=False),)

    def combine(self, step, logits, branch_logits):
        # `step` is an int or (fast path) a device tensor: tensor arithmetic serves both
        gamma = torch.exp(-self.config.decay * (torch.as_tensor(step, device=logits.device) + 1).float())
        cond = torch.log_softmax(logits, dim=-1)
        uncond = torch.log_softmax(branch_logits[0].float(), dim=-1)
        return cond + (1 - gamma) / gamma * (cond - uncond)
