"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv:2403.06764).

After layer ``K`` (default 2) each sample's image tokens are ranked by the attention the
*last prompt token* pays them at layer ``K - 1``, averaged over heads, on the unedited
scores; the top ``1 - R`` (default ``R = 0.5``) stay, the rest are dropped from the hidden
states, the positions and the KV cache of every layer ``>= K``. See
:mod:`vlmfix.methods._pruning` for the mechanics (real dropping through scoped hooks).

Deviations from the released code (all deliberate):

* per-sample ranking inside a left-padded batch (the released code ranks batch element 0
  and hard-codes the image at positions 35..611); image tokens come from the layout;
* kept tokens keep their original RoPE positions (as the released "inplace" variant);
  ``repack_positions=True`` renumbers them;
* the ranking row is the last *prompt* row of the sequence (with the KV cache the released
  code's "last row" at the prefill; without the cache vlmfix reuses that ranking, so cache
  on = cache off);
* the budget is ``round((1 - R) * n)`` of each sample's own image-token count ``n`` (any-res
  images hold different counts); LLaVA-NeXT ``image_newline`` tokens are ranked like any
  image token (``newlines="keep"`` always keeps them and leaves them out of the budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.methods import register
from vlmfix.methods._pruning import PruningRuntime, Stage, check_pruning_fields
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["FastV"]

COMMON_HELP = {
    "newlines": "LLaVA-NeXT/OneVision image_newline tokens: 'rank' like other image tokens, or 'keep' always",
    "branch_ranking": "contrast branch rows (VCD, ...) rank by their 'own' attention or copy the 'main' row's",
    "repack_positions": "renumber kept tokens' RoPE positions 0..n-1 (default: keep the original positions)",
}


@register
@dataclass(frozen=True)
class FastV(MethodConfig):
    """Drop the least-attended image tokens after layer ``K``.

    Args:
        k: first decoder layer that sees the pruned sequence (ranking at layer ``k - 1``).
        ratio: share ``R`` of each sample's image tokens dropped (0 keeps all).
        newlines, branch_ranking, repack_positions: see :mod:`vlmfix.methods._pruning`.

    Example:
        >>> out = vlmfix.generate(model, processor, [img], ["Describe."], methods=[vlmfix.FastV()])  # doctest: +SKIP
    """

    name: ClassVar[str] = "fastv"
    order: ClassVar[int] = 50
    paper: ClassVar[str] = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024 (arXiv:2403.06764)"

    k: int = help_field(2, "first decoder layer after pruning; image tokens are ranked at layer k-1")
    ratio: float = help_field(0.5, "share R of image tokens dropped (keep the top 1-R by attention)")
    newlines: str = help_field("rank", COMMON_HELP["newlines"])
    branch_ranking: str = help_field("own", COMMON_HELP["branch_ranking"])
    repack_positions: bool = help_field(False, COMMON_HELP["repack_positions"])

    def __post_init__(self):
        self._check(isinstance(self.k, int) and self.k >= 1, "k", "an int >= 1 (layer k-1 ranks the tokens)")
        self._check(isinstance(self.ratio, (int, float)) and 0 <= self.ratio <= 1, "ratio", "a number in [0, 1]")
        check_pruning_fields(self)

    def build(self) -> Method:
        return FastVRuntime(self)


class FastVRuntime(PruningRuntime):
    config: FastV

    def on_attach(self, handle) -> None:
        c = self.config
        self.stages = [Stage(layer=c.k, keep=1.0 - float(c.ratio), rank_layer=c.k - 1)]
        super().on_attach(handle)
