"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models
via Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv:2410.17247), training-free use.

The LM is split into stages at layers ``[8, 16, 24]`` (of 32; scaled to the model's depth).
At the start of each stage the image tokens still present are ranked by the attention the
*last instruction token* (the last prompt token) pays them at the layer before, averaged
over heads, and only enough stay to keep ``[0.5, 0.25, 0.125]`` of each sample's original
image tokens. Mechanics: :mod:`vlmfix.methods._pruning` (real dropping; later stages rank
only the tokens earlier stages kept).

Deviations: the released code requires right padding and batch-shared counts; vlmfix ranks
per sample in a left-padded batch with per-sample budgets (``round(keep * n)`` of each
sample's own image tokens). The paper's ranking query is the last instruction token, which
is the last prompt token of LLaVA's chat template up to the assistant prefix; vlmfix uses the
last prompt token (the same row FastV uses), so one measured row serves both methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.methods import register
from vlmfix.methods._pruning import PruningRuntime, Stage, check_pruning_fields, scaled_layer
from vlmfix.methods.base import Method, MethodConfig, help_field
from vlmfix.methods.fastv import COMMON_HELP

__all__ = ["PyramidDrop"]


@register
@dataclass(frozen=True)
class PyramidDrop(MethodConfig):
    """Multi-stage pruning ranked by the last instruction token's attention.

    Args:
        layers: stage boundaries, for a ``reference_depth``-layer LM (scaled to the model).
        keep: share of each sample's original image tokens kept from each stage on.
        reference_depth: depth the ``layers`` are given for (32: LLaVA-1.5-7B).
        newlines, branch_ranking, repack_positions: see :mod:`vlmfix.methods._pruning`.
    """

    name: ClassVar[str] = "pdrop"
    order: ClassVar[int] = 50
    paper: ClassVar[str] = "Xing et al., PyramidDrop, CVPR 2025 (arXiv:2410.17247)"

    layers: tuple[int, ...] = help_field((8, 16, 24), "stage boundaries for a reference_depth-layer LM")
    keep: tuple[float, ...] = help_field((0.5, 0.25, 0.125), "share of original image tokens kept from each stage")
    reference_depth: int = help_field(32, "depth the layers are given for; scaled to the model's depth")
    newlines: str = help_field("rank", COMMON_HELP["newlines"])
    branch_ranking: str = help_field("own", COMMON_HELP["branch_ranking"])
    repack_positions: bool = help_field(False, COMMON_HELP["repack_positions"])

    def __post_init__(self):
        self._check(
            isinstance(self.layers, tuple)
            and len(self.layers) >= 1
            and all(isinstance(i, int) for i in self.layers)
            and all(a < b for a, b in zip(self.layers, self.layers[1:]))
            and self.layers[0] >= 1,
            "layers",
            "a tuple of increasing ints >= 1, e.g. (8, 16, 24)",
        )
        self._check(
            isinstance(self.keep, tuple)
            and len(self.keep) == len(self.layers)
            and all(isinstance(k, (int, float)) and 0 <= k <= 1 for k in self.keep)
            and all(a >= b for a, b in zip(self.keep, self.keep[1:])),
            "keep",
            f"a non-increasing tuple of {len(self.layers)} shares in [0, 1], one per layer",
        )
        self._check(
            isinstance(self.reference_depth, int) and self.reference_depth >= 1, "reference_depth", "an int >= 1"
        )
        check_pruning_fields(self)

    def build(self) -> Method:
        return PyramidDropRuntime(self)


class PyramidDropRuntime(PruningRuntime):
    config: PyramidDrop

    def on_attach(self, handle) -> None:
        c = self.config
        n = handle.controller.num_layers
        layers = [max(1, scaled_layer(layer, n, c.reference_depth)) for layer in c.layers]
        if len(set(layers)) != len(layers):
            from vlmfix.errors import ConfigError

            raise ConfigError(
                f"pdrop: layers={c.layers!r} scaled to {n} layers collide ({layers}); pass fewer stages or "
                "reference_depth equal to the model's depth"
            )
        self.stages = [Stage(layer=layer, keep=float(k), rank_layer=layer - 1) for layer, k in zip(layers, c.keep)]
        super().on_attach(handle)
