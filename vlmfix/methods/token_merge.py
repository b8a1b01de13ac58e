"""Redundancy merging of adjacent image tokens before the LM (VMTC-style), training-free.

Neighbouring patches of an image are often near-duplicates. Per sample, the cosine
similarity of every image token's LM input embedding with its predecessor's (in the
processor's token order, within one image and one grid part: base grid, any-res grid)
is computed; the ``round(ratio * n)`` most similar neighbour pairs are merged, chains of
merged pairs form groups, and each group becomes one token at its first member's position
(original RoPE position) holding the group's mean embedding. Every LM layer, the KV cache
and every decode step see fewer tokens. Mechanics: :mod:`vlmfix.methods._pruning`.

Deviations: the VMTC-style papers cluster inside the vision tower or with learned
projections; vlmfix merges only *adjacent* tokens of the projected features (no training,
any family), so a group is a run of the raster order (a piece of a row, or a row end joined
to the next row's start). LLaVA-NeXT ``image_newline`` tokens are never merged (they mark
rows); ``newlines`` therefore only accepts its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.layout import Part
from vlmfix.methods import register
from vlmfix.methods._pruning import PruningRuntime, Stage, check_pruning_fields
from vlmfix.methods.base import Method, MethodConfig, help_field
from vlmfix.methods.fastv import COMMON_HELP

__all__ = ["TokenMerge", "adjacent_groups"]


@register
@dataclass(frozen=True)
class TokenMerge(MethodConfig):
    """Merge the most similar adjacent image tokens before the LM.

    Args:
        ratio: share of each sample's image tokens removed by merging.
        branch_ranking, repack_positions: see :mod:`vlmfix.methods._pruning`.
    """

    name: ClassVar[str] = "token_merge"
    order: ClassVar[int] = 40
    paper: ClassVar[str] = "adjacent redundancy merging of projected visual tokens (VMTC-style), no training"

    ratio: float = help_field(0.5, "share of image tokens removed by merging similar neighbours")
    newlines: str = help_field("keep", "image_newline tokens are never merged (only 'keep')")
    branch_ranking: str = help_field("own", COMMON_HELP["branch_ranking"])
    repack_positions: bool = help_field(False, COMMON_HELP["repack_positions"])

    def __post_init__(self):
        self._check(isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1, "ratio", "a number in [0, 1)")
        self._check(self.newlines == "keep", "newlines", "'keep' (newline tokens mark rows and are never merged)")
        check_pruning_fields(self)

    def build(self) -> Method:
        return TokenMergeRuntime(self)


def adjacent_groups(hidden: torch.Tensor, mergeable: torch.Tensor, parts: torch.Tensor, n_merge: list[int]):
    """Group ids of the ``n_merge[b]`` most similar adjacent pairs, per sample.

    Args:
        hidden: ``[B, T, E]``.
        mergeable: bool ``[B, T]``, tokens that may merge.
        parts: ``[B, T]`` grid parts; pairs never cross parts.
        n_merge: per sample, how many pairs to merge.

    Returns:
        ``(first [B, T] bool, group [B, T] long)``: group heads, and each row's group head
        index (its own index when it is not merged into anything).
    """
    B, T, _ = hidden.shape
    x = torch.nn.functional.normalize(hidden.float(), dim=-1)
    sim = (x[:, 1:] * x[:, :-1]).sum(-1)  # [B, T-1]: token j with j-1
    pair = mergeable[:, 1:] & mergeable[:, :-1] & (parts[:, 1:] == parts[:, :-1])
    sim = torch.where(pair, sim, torch.full_like(sim, float("-inf")))
    order = torch.sort(sim, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T - 1, device=order.device).expand_as(order))
    join = (rank < torch.as_tensor(n_merge, device=hidden.device)[:, None]) & pair  # j joins j-1
    first = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
    first[:, 1:] = ~join
    ar = torch.arange(T, device=hidden.device).expand(B, T)
    group = torch.where(first, ar, torch.zeros_like(ar)).cummax(-1).values
    return first, group


class TokenMergeRuntime(PruningRuntime):
    config: TokenMerge

    def on_attach(self, handle) -> None:
        self.stages = [Stage(layer=0, keep=1.0 - float(self.config.ratio))]
        super().on_attach(handle)

    def select(self, stage, hidden, layout):
        mergeable = layout.image_mask & (layout.parts != Part.NEWLINE)
        n = self._sel_meta["ranked_original"]
        n_merge = [int(round(self.config.ratio * m)) for m in n]
        first, group = adjacent_groups(hidden, mergeable, layout.parts, n_merge)
        self._group = group
        return first

    def merge(self, stage, hidden, layout, keep):
        group = self._group
        E = hidden.shape[-1]
        sums = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        sums.scatter_add_(1, group[..., None].expand(-1, -1, E), hidden.float())
        counts = torch.zeros(group.shape, dtype=torch.float32, device=hidden.device)
        counts.scatter_add_(1, group, torch.ones_like(counts))
        mean = (sums / counts.clamp_min(1)[..., None]).to(hidden.dtype)
        return torch.where(keep[..., None], mean, hidden)
