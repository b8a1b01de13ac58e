"""LOL: LOwer Layer Matters (Chen et al., arXiv:2408.08769, "Lower Layers Matter: Alleviating
Hallucination via Multi-Layer Fusion Contrastive Decoding with Truthfulness Refocused").

Neither the paper's method section nor released code could be read for vlmfix (the
abstract says the code will be released upon acceptance); this is the method as its
abstract states it, on vlmfix's terms, with every choice named in ``docs/methods.md``:

* **contrastive decoding against an amateur with induced hallucination**: the amateur is
  the same model given a hallucination-inducing instruction as system prompt (a contrast
  row, as ICD does), since no hallucination-tuned amateur model exists for LLaVA;
* **multi-layer fusion**: the contrast is taken at the final layer *and* at a lower layer
  (early-exit logits of the same forward), and the two are added:
  ``[(1 + a) l_L - a l'_L] + w [(1 + a) l_j - a l'_j]``, ``-inf`` where the expert's
  ``p < beta * max p``;
* **truthfulness refocused**: the expert is the model given a truthfulness instruction as
  system prompt (another contrast row); with an empty ``refocus`` the main rows are the
  expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.branches import BranchSpec, plausible
from vlmfix.methods import register
from vlmfix.methods._hidden import LayerOutputs, depth_scaled_layers, early_exit_logits
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["LOL"]


@register
@dataclass(frozen=True)
class LOL(MethodConfig):
    """Multi-layer fusion contrastive decoding with a truthfulness-refocused expert.

    The instructions, the lower layer and the fusion weight are vlmfix's choices (the
    paper's could not be read); ``lower_layer`` is stated for a 32-layer LM and mapped to
    other depths like DeCo's and VISTA's layers.
    """

    name: ClassVar[str] = "lol"
    order: ClassVar[int] = 300
    paper: ClassVar[str] = "https://arxiv.org/abs/2408.08769"

    alpha: float = help_field(1.0, "contrast strength a: (1 + a) * expert - a * amateur, at both layers")
    beta: float = help_field(0.1, "plausibility cutoff on the expert's final layer (0 keeps all)")
    lower_layer: int = help_field(16, "the lower layer contrasted too (0-based decoder layer, for a 32-layer LM)")
    fusion_weight: float = help_field(1.0, "w: weight of the lower-layer contrast added to the final-layer one")
    amateur: str = help_field(
        "You are a confused object detector.", "system prompt that induces hallucination in the amateur rows"
    )
    refocus: str = help_field(
        "You are a careful assistant. Describe only what is truly visible in the image.",
        "system prompt of the truthfulness-refocused expert rows ('' = the main rows are the expert)",
    )

    def __post_init__(self):
        self._check(self.alpha >= 0, "alpha", ">= 0")
        self._check(0 <= self.beta < 1, "beta", "in [0, 1)")
        self._check(isinstance(self.lower_layer, int) and self.lower_layer >= 0, "lower_layer", "an int >= 0")
        self._check(self.fusion_weight >= 0, "fusion_weight", ">= 0")
        self._check(isinstance(self.amateur, str) and self.amateur.strip() != "", "amateur", "a non-empty instruction")
        self._check(isinstance(self.refocus, str), "refocus", "a string ('' turns the refocused expert off)")

    def build(self) -> Method:
        return LOLMethod(self)


class LOLMethod(Method):
    def __init__(self, config: LOL):
        super().__init__(config)
        self._outputs: LayerOutputs | None = None
        self._layer = 0

    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        cfg = self.config
        depth = len(handle.adapter.decoder_layers(handle.model))
        (self._layer,) = depth_scaled_layers((), cfg.lower_layer, cfg.lower_layer + 1, depth, cfg.name)
        self._outputs = LayerOutputs(handle, [self._layer])

    def on_detach(self) -> None:
        self._outputs = None
        super().on_detach()

    def branches(self) -> tuple[BranchSpec, ...]:
        cfg = self.config
        specs = [BranchSpec("amateur", system=cfg.amateur)]
        if cfg.refocus.strip():
            specs.append(BranchSpec("refocused", system=cfg.refocus))
        return tuple(specs)

    def _lower(self, rows, device):
        return early_exit_logits(self.handle, self._outputs.last(self._layer, rows)).to(device)

    def combine(self, step, logits, branch_logits):
        cfg, rows = self.config, self.handle.controller.rows
        amateur_rows = rows.branch_rows(rows.branches.index((self.name, "amateur")))
        if len(branch_logits) > 1:
            expert, expert_lower = (
                branch_logits[1].float(),
                self._lower(rows.branch_rows(rows.branches.index((self.name, "refocused"))), logits.device),
            )
        else:
            expert, expert_lower = logits, self._lower(rows.main_rows, logits.device)
        a = cfg.alpha
        final = (1 + a) * expert - a * branch_logits[0].float()
        lower = (1 + a) * expert_lower - a * self._lower(amateur_rows, logits.device)
        fused = final + cfg.fusion_weight * lower
        return fused.masked_fill(~plausible(expert, cfg.beta), float("-inf"))
