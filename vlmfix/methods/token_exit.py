"""Visual-token exit: every image token leaves the sequence after layer ``K``.

The training-free form of "Dynamic Visual-Token Exit" / VTW ("Boosting Multimodal Large
Language Models with Visual Tokens Withdrawal", Lin et al., AAAI 2025, arXiv:2405.05803):
the image has been read into the text tokens by then, so layers ``>= K`` hold no image
keys at all. VTW withdraws at about half depth; ``layer=None`` means ``num_layers // 2``.
Same mechanics as :mod:`vlmfix.methods._pruning` (real dropping).

Deviation: VTW picks ``K`` per model from a KL criterion on a calibration set; vlmfix
takes ``K`` as given (half depth by default). ``newlines="keep"`` keeps LLaVA-NeXT's
``image_newline`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.methods import register
from vlmfix.methods._pruning import PruningRuntime, Stage, check_pruning_fields
from vlmfix.methods.base import Method, MethodConfig, help_field
from vlmfix.methods.fastv import COMMON_HELP

__all__ = ["TokenExit"]


@register
@dataclass(frozen=True)
class TokenExit(MethodConfig):
    """Drop all image tokens from layer ``layer`` on.

    Args:
        layer: first decoder layer without image tokens; None = half the depth.
        newlines, branch_ranking, repack_positions: see :mod:`vlmfix.methods._pruning`.
    """

    name: ClassVar[str] = "token_exit"
    order: ClassVar[int] = 50
    paper: ClassVar[str] = "Lin et al., Visual Tokens Withdrawal, AAAI 2025 (arXiv:2405.05803)"

    layer: int | None = help_field(None, "first decoder layer without image tokens (None = num_layers // 2)")
    newlines: str = help_field("rank", COMMON_HELP["newlines"])
    branch_ranking: str = help_field("own", COMMON_HELP["branch_ranking"])
    repack_positions: bool = help_field(False, COMMON_HELP["repack_positions"])

    def __post_init__(self):
        self._check(
            self.layer is None or (isinstance(self.layer, int) and self.layer >= 0), "layer", "None or an int >= 0"
        )
        check_pruning_fields(self)

    def build(self) -> Method:
        return TokenExitRuntime(self)


class TokenExitRuntime(PruningRuntime):
    config: TokenExit

    def on_attach(self, handle) -> None:
        layer = self.config.layer
        if layer is None:
            layer = handle.controller.num_layers // 2
        self.stages = [Stage(layer=layer, keep=0.0)]
        super().on_attach(handle)

    def scores(self, stage, hidden, layout):
        return torch.zeros(layout.labels.shape, device=layout.labels.device)
