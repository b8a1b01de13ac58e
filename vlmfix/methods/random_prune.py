"""Random visual-token pruning: the control every pruning method should be compared with.

The same mechanics and budget as :class:`~vlmfix.FastV` (drop a share ``R`` of each
sample's image tokens from layer ``K`` on; ``layer=0`` prunes the LM input, the budget of a
pre-LM method such as :class:`~vlmfix.VisionZip`), but the kept tokens are chosen at random.

The draw is a fixed function of ``seed`` and the token's *position*: one uniform score per
position from a ``torch.Generator`` seeded with ``seed``. So a sample keeps the same tokens
whatever batch it is in (batch = per-sample) and whether the KV cache is on or off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.methods import register
from vlmfix.methods._pruning import PruningRuntime, Stage, check_pruning_fields
from vlmfix.methods.base import Method, MethodConfig, help_field
from vlmfix.methods.fastv import COMMON_HELP

__all__ = ["RandomPrune"]


@register
@dataclass(frozen=True)
class RandomPrune(MethodConfig):
    """Drop a random share of the image tokens from layer ``layer`` on (a control).

    Args:
        layer: first decoder layer that sees the pruned sequence (0 = the LM input).
        ratio: share of each sample's image tokens dropped.
        seed: seed of the per-position random scores.
        newlines, branch_ranking, repack_positions: see :mod:`vlmfix.methods._pruning`.
    """

    name: ClassVar[str] = "random_prune"
    order: ClassVar[int] = 50
    paper: ClassVar[str] = "control: random token pruning at the budget of the method it is compared with"

    layer: int = help_field(2, "first decoder layer after pruning (0 = prune the LM input)")
    ratio: float = help_field(0.5, "share of image tokens dropped, chosen at random")
    seed: int = help_field(0, "seed of the per-position random scores")
    newlines: str = help_field("rank", COMMON_HELP["newlines"])
    branch_ranking: str = help_field("own", COMMON_HELP["branch_ranking"])
    repack_positions: bool = help_field(False, COMMON_HELP["repack_positions"])

    def __post_init__(self):
        self._check(isinstance(self.layer, int) and self.layer >= 0, "layer", "an int >= 0")
        self._check(isinstance(self.ratio, (int, float)) and 0 <= self.ratio <= 1, "ratio", "a number in [0, 1]")
        self._check(isinstance(self.seed, int), "seed", "an int")
        check_pruning_fields(self)

    def build(self) -> Method:
        return RandomPruneRuntime(self)


def position_scores(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform scores ``[B, T]`` that depend only on ``seed`` and each token's position."""
    n = int(positions.max()) + 1  # prefill only
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(n, generator=g).to(positions.device)
    return table[positions]


class RandomPruneRuntime(PruningRuntime):
    config: RandomPrune

    def on_attach(self, handle) -> None:
        self.stages = [Stage(layer=self.config.layer, keep=1.0 - float(self.config.ratio))]
        super().on_attach(handle)

    def scores(self, stage, hidden, layout):
        return position_scores(layout.positions, self.config.seed)
