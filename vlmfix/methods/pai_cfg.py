"""PAI-CFG: the classifier-free-guidance branch of PAI (Liu et al., ECCV 2024, arXiv:2407.21771).

PAI's attention edit (``vlmfix.methods.pai``) is one half of the paper; the other half
subtracts the language prior with an image-free row:
``gamma (log p_img - log p_noimg) + log p_noimg``, ``-inf`` where ``p_img < beta max p_img``.
Attach both (``[PAI(), PAICFG()]``) for the full method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.branches import BranchSpec, guidance
from vlmfix.methods import register
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["PAICFG"]


@register
@dataclass(frozen=True)
class PAICFG(MethodConfig):
    """PAI's image-free guidance branch.

    Attached together with an attention method such as PAI, the image-free rows also
    receive the attention edit (they have no image keys, so PAI leaves them unchanged).
    """

    name: ClassVar[str] = "pai_cfg"
    order: ClassVar[int] = 300
    paper: ClassVar[str] = "https://arxiv.org/abs/2407.21771"

    gamma: float = help_field(1.1, "guidance scale: gamma * (log p_img - log p_noimg) + log p_noimg")
    beta: float = help_field(0.1, "plausibility cutoff: keep tokens with p >= beta * max p (0 keeps all)")

    def __post_init__(self):
        self._check(self.gamma > 0, "gamma", "> 0")
        self._check(0 <= self.beta < 1, "beta", "in [0, 1)")

    def build(self) -> Method:
        return PAICFGMethod(self)


class PAICFGMethod(Method):
    def branches(self) -> tuple[BranchSpec, ...]:
        return (BranchSpec("no_image", with_image=False),)

    def combine(self, step, logits, branch_logits):
        return guidance(logits, branch_logits[0], self.config.gamma, self.config.beta)
