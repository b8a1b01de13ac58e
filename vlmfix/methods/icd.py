"""ICD: Instruction Contrastive Decoding (Wang et al., Findings of ACL 2024, arXiv:2403.18715).

The contrast row gets the same image and question with a *disturbance instruction* as its
system prompt ("You are a confused object detector.", one of the paper's role prefixes),
which amplifies hallucination-prone predictions; they are subtracted as in VCD:
``(1 + alpha) l - alpha l'``, ``-inf`` where ``p < beta * max p``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.branches import BranchSpec, contrast
from vlmfix.methods import register
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["ICD"]


@register
@dataclass(frozen=True)
class ICD(MethodConfig):
    """Instruction Contrastive Decoding: contrast with a disturbed system prompt.

    The main rows keep the processor's chat template unchanged (no system prompt is added);
    only the contrast rows get ``disturbance`` as their system turn. Needs
    ``apply_chat_template=True``.
    """

    name: ClassVar[str] = "icd"
    order: ClassVar[int] = 300
    paper: ClassVar[str] = "https://arxiv.org/abs/2403.18715"

    disturbance: str = help_field("You are a confused object detector.", "system prompt of the contrast branch")
    alpha: float = help_field(1.0, "contrast strength: (1 + alpha) * l - alpha * l_disturbed")
    beta: float = help_field(0.1, "plausibility cutoff: keep tokens with p >= beta * max p (0 keeps all)")

    def __post_init__(self):
        self._check(bool(self.disturbance and self.disturbance.strip()), "disturbance", "a non-empty instruction")
        self._check(self.alpha >= 0, "alpha", ">= 0")
        self._check(0 <= self.beta < 1, "beta", "in [0, 1)")

    def build(self) -> Method:
        return ICDMethod(self)


class ICDMethod(Method):
    graph_reusable = True  # stateless combine: a captured step serves later calls

    def branches(self) -> tuple[BranchSpec, ...]:
        return (BranchSpec("disturbed_instruction", system=self.config.disturbance),)

    def combine(self, step, logits, branch_logits):
        return contrast(logits, branch_logits[0], self.config.alpha, self.config.beta)
