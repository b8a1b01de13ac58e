"""VisionZip-style pre-LM token selection (Yang et al., "VisionZip: Longer is Better but Not
Necessary in Vision Language Models", CVPR 2025, arXiv:2412.04467), training-free.

Before the first decoder layer each image keeps

* its **dominant** tokens: the ones the vision tower's ``[CLS]`` token attends to most at
  the penultimate ViT layer (head-averaged, the layer LLaVA takes its features from); for
  towers without ``[CLS]`` (SigLIP, LLaVA-OneVision) the tokens whose LM input embedding
  has the largest L2 norm;
* a few **contextual** tokens: the remaining tokens are split into ``contextual`` groups
  around targets spaced evenly over them (in token order); each remaining token joins the
  target whose embedding it is most cosine-similar to, and the target's embedding becomes
  the group's mean.

Everything else leaves the sequence, so every LM layer, the KV cache and every decode step
are cheaper. Mechanics: :mod:`vlmfix.methods._pruning` (a stage at layer 0; kept and merged
tokens keep their original RoPE positions).

Budget: ``dominant + contextual`` tokens per ``per_tokens`` image tokens, scaled to each
sample's own image-token count: 54 + 10 per 576 is the paper's 64-token setting for
LLaVA-1.5; LLaVA-NeXT images (base grid + any-res grid) get the same share of their
~2000-2900 tokens (the paper prunes each crop to the same count, which is the same share).

Deviations: the paper merges contextual tokens by the ViT's key similarity inside the
vision tower; vlmfix merges the projected features (LM input embeddings), after the
projector, so the same code serves every family and the any-res packing stays untouched.
Any-res ``[CLS]`` scores are placed on the LM tokens exactly as the model arranges the crop
features (see PAINT); ``image_newline`` tokens have no ViT score and are never dominant
(``newlines="keep"`` keeps them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.methods import register
from vlmfix.methods._pruning import PruningRuntime, Stage, check_pruning_fields, top_keep
from vlmfix.methods.base import Method, MethodConfig, help_field
from vlmfix.methods.fastv import COMMON_HELP

__all__ = ["VisionZip", "contextual_merge"]


@register
@dataclass(frozen=True)
class VisionZip(MethodConfig):
    """Keep the dominant image tokens plus a few merged contextual ones, before the LM.

    Args:
        dominant: dominant tokens per ``per_tokens`` image tokens.
        contextual: merged contextual tokens per ``per_tokens`` image tokens.
        per_tokens: the image-token count the budget is given for (576: LLaVA-1.5).
        newlines, branch_ranking, repack_positions: see :mod:`vlmfix.methods._pruning`.
    """

    name: ClassVar[str] = "visionzip"
    order: ClassVar[int] = 40
    paper: ClassVar[str] = "Yang et al., VisionZip, CVPR 2025 (arXiv:2412.04467)"

    dominant: int = help_field(54, "dominant tokens (most [CLS]-attended, or largest norm) per per_tokens")
    contextual: int = help_field(10, "merged contextual tokens per per_tokens image tokens")
    per_tokens: int = help_field(576, "image tokens the budget is given for; scaled to each sample's count")
    newlines: str = help_field("rank", COMMON_HELP["newlines"])
    branch_ranking: str = help_field("own", COMMON_HELP["branch_ranking"])
    repack_positions: bool = help_field(False, COMMON_HELP["repack_positions"])

    def __post_init__(self):
        self._check(isinstance(self.dominant, int) and self.dominant >= 0, "dominant", "an int >= 0")
        self._check(isinstance(self.contextual, int) and self.contextual >= 0, "contextual", "an int >= 0")
        self._check(isinstance(self.per_tokens, int) and self.per_tokens >= 1, "per_tokens", "an int >= 1")
        check_pruning_fields(self)

    def build(self) -> Method:
        return VisionZipRuntime(self)


def contextual_merge(hidden: torch.Tensor, rest: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Merge every ``rest`` row into its most cosine-similar ``targets`` row (per sample);
    each target becomes the mean of itself and the rows merged into it.

    Args:
        hidden: ``[B, T, E]``.
        rest, targets: bool ``[B, T]`` (disjoint).

    Returns:
        ``[B, T, E]``: ``hidden`` with the targets' rows replaced by their group means.
    """
    out = hidden.clone()
    x = torch.nn.functional.normalize(hidden.float(), dim=-1)
    for b in range(hidden.shape[0]):
        t_idx = targets[b].nonzero()[:, 0]
        r_idx = rest[b].nonzero()[:, 0]
        if t_idx.numel() == 0 or r_idx.numel() == 0:
            continue
        owner = (x[b, r_idx] @ x[b, t_idx].T).argmax(-1)  # [n_rest]
        sums = hidden[b, t_idx].float().index_add(0, owner, hidden[b, r_idx].float())
        counts = torch.ones(t_idx.numel(), device=hidden.device).index_add(
            0, owner, torch.ones(r_idx.numel(), device=hidden.device)
        )
        out[b, t_idx] = (sums / counts[:, None]).to(hidden.dtype)
    return out


def evenly_spaced(mask: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Bool ``[B, T]``: per row, ``counts[b]`` of the True entries of ``mask``, evenly spaced
    in order (the first one included)."""
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        idx = mask[b].nonzero()[:, 0]
        n = min(counts[b], idx.numel())
        if n:
            pick = (torch.arange(n, device=idx.device) * idx.numel()) // n
            out[b, idx[pick]] = True
    return out


def cls_scores_on_tokens(handle, layout, vit: torch.Tensor, image_sizes) -> torch.Tensor:
    """ViT ``[CLS]`` scores ``[crops, 1 + patches]`` placed on the LM's image tokens ``[B, L]``
    (-inf where a token has none: newlines, or an any-res grid that cannot be placed), with
    PAINT's mapping of crops to tokens (the model's own arrangement of the crop features)."""
    from vlmfix.methods import paint

    config = handle.model.config
    out = torch.full(layout.labels.shape, float("-inf"))
    vit = vit.float().cpu()
    image_mask = layout.image_mask.cpu()
    parts = layout.parts.cpu()
    runs = [(b, s, e) for b in range(layout.batch_size) for s, e in paint._image_runs(image_mask[b])]
    if image_sizes is not None:
        known = torch.as_tensor(image_sizes).tolist()
        sizes = [known[i] if i < len(known) else None for i in range(len(runs))]
        counts, grids = [paint._num_crops(config, handle.adapter, s) for s in sizes], [None] * len(runs)
    else:
        sizes = [None] * len(runs)
        counts, grids = paint._infer_crop_grids(
            config, handle.adapter, [parts[b, s:e] for b, s, e in runs], vit.shape[0]
        )
        if counts is None:
            return out
    crop = 0
    for i, (b, s, e) in enumerate(runs):
        scores = paint._scores_for_run(config, vit[crop : crop + counts[i]], parts[b, s:e], sizes[i], True, grids[i])
        crop += counts[i]
        if scores is not None:
            out[b, s:e] = scores
    return out


class VisionZipRuntime(PruningRuntime):
    config: VisionZip

    def on_attach(self, handle) -> None:
        self.stages = [Stage(layer=0, keep=1.0)]
        super().on_attach(handle)
        from vlmfix.methods.paint import vision_encoder_layers

        tower = handle.adapter.get(handle.model, "vision_tower")
        self._has_cls = any(hasattr(m, "class_embedding") for m in tower.modules())
        self._vit = None
        self._image_sizes = None
        if self._has_cls:
            layers = vision_encoder_layers(tower)
            layer = layers[max(0, len(layers) - 2)]
            handle.add_hook(layer.self_attn.register_forward_pre_hook(self._vit_hook, with_kwargs=True))

    def _vit_hook(self, module, args, kwargs):
        from vlmfix.methods.paint import vit_token_scores

        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is not None and self._acts():
            with torch.no_grad():
                self._vit = vit_token_scores(module, x, True)
        return None

    def on_forward(self, handle, kwargs) -> None:
        super().on_forward(handle, kwargs)
        if self.tracker.new_sequence:
            self._image_sizes = kwargs.get("image_sizes")

    def scores(self, stage, hidden, layout):
        if not self._has_cls:
            return hidden.float().norm(dim=-1)
        vit, self._vit = self._vit, None
        if vit is None:
            from vlmfix.errors import StateError

            raise StateError("visionzip: the vision tower's [CLS] attention was not captured for this prompt")
        return cls_scores_on_tokens(self.handle, layout, vit, self._image_sizes).to(hidden.device)

    def select(self, stage, hidden, layout):
        c = self.config
        ranked = self._ranked(layout)
        scores = self._branch_scores(self.scores(stage, hidden, layout), ranked)
        n = self._sel_meta["ranked_original"]
        dom = [min(m, int(round(c.dominant * m / c.per_tokens))) for m in n]
        ctx = [min(m - d, int(round(c.contextual * m / c.per_tokens))) for m, d in zip(n, dom)]
        dominant = top_keep(scores, ranked, dom)
        rest = ranked & ~dominant
        targets = evenly_spaced(rest, ctx)
        self._merge = (rest & ~targets, targets)
        return dominant | targets | ~ranked

    def merge(self, stage, hidden, layout, keep):
        rest, targets = self._merge
        if not bool(targets.any()) or not bool(rest.any()):  # prefill only
            return hidden
        return contextual_merge(hidden, rest, targets)
