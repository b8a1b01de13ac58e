"""PAINT: Paying Attention to INformed Tokens (Arif et al., 2025, arXiv:2501.12206).

Two sets of image tokens are found from the vision tower's own attention:

* **local tokens**: the top ``local_fraction`` (25%) of each image's tokens by the ViT's
  attention at its *first* layer;
* **summary tokens**: the outliers of the ViT's attention at its *penultimate* layer over
  the image's tokens. Default ``summary_rule="iqr"``, the released code's rule: score >
  Q3 + ``summary_iqr`` * (Q3 - Q1), ``summary_iqr = 1.5`` (linear-interpolated quartiles);
  ``summary_rule="sigma"``: score > mean + ``summary_sigma`` * std (population std).
  A token that is both is treated as a summary token (as in the released code).

The ViT attention of a token is the CLS row's attention to it (head-averaged) when the tower
has a CLS token (CLIP). SigLIP (LLaVA-OneVision) has none; there the score is the mean
attention the token *receives* over all query rows and heads. vlmfix computes these from
the ViT layer's own ``q_proj`` / ``k_proj`` in a scoped forward pre-hook; the vision tower
keeps its attention implementation.

In LM layers 2..N-1, on the last prompt row and every generated row (as PAI), the scores on
these keys are boosted before the softmax: ``z <- z + s_lh * (alpha * 1[local] + beta *
1[summary]) * |z|`` with ``alpha = 0.7``, ``beta = 0.3``. ``s_lh`` is the head's measured
visual sensitivity: the head's attention mass on the image at the first generated token
(before any boost), divided by the largest such mass among the layer's heads (per sample),
so the most visual head gets the full boost. Measured once per sequence and reused.

Any-res models (LLaVA-NeXT / OneVision): base-grid tokens take the base crop's scores; any-res
grid tokens take their crop's scores arranged, unpadded and (OneVision) bilinearly resized
exactly as the model arranges the features; ``image_newline`` tokens are never boosted.
Without ``image_sizes`` (stock ``generate`` encodes images first and does not pass them) the
crop grids are inferred from the layout and the number of crops (see
:func:`_infer_crop_grids`); an image whose grid stays ambiguous gets its base grid only.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmfix.layout import Part
from vlmfix.methods import register
from vlmfix.methods._attn_utils import (
    SequenceTracker,
    accumulate,
    check_layer_fields,
    edit_rows,
    layer_set,
)
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["PAINT", "PAINTRuntime", "LOCAL", "SUMMARY"]

logger = logging.getLogger(__name__)

LOCAL, SUMMARY = 1, 2
SUMMARY_RULES = ("iqr", "sigma")


@register
@dataclass(frozen=True)
class PAINT(MethodConfig):
    """Boost attention on the ViT's local and summary tokens, per head by visual sensitivity.

    Args:
        alpha: boost of local tokens (``z + s * alpha * |z|``).
        beta: boost of summary tokens.
        local_fraction: share of each image's tokens that are local (top by first-layer
            ViT attention).
        summary_rule: how summary tokens are found at the penultimate ViT layer:
            ``"iqr"`` (released code: score > Q3 + ``summary_iqr`` * IQR) or ``"sigma"``
            (score > mean + ``summary_sigma`` * std).
        summary_iqr: IQR multiplier of the ``"iqr"`` rule.
        summary_sigma: std multiplier of the ``"sigma"`` rule.
        head_sensitivity: scale each head's boost by its measured visual sensitivity
            (False: every head gets the full boost).
        start_layer, end_layer, layers: edited LM layers, as in :class:`~vlmfix.PAI`.

    Example:
        >>> out = vlmfix.generate(model, processor, [img], ["Describe."], methods=[vlmfix.PAINT()])  # doctest: +SKIP
    """

    name: ClassVar[str] = "paint"
    order: ClassVar[int] = 210
    paper: ClassVar[str] = "Arif et al., PAINT: Paying Attention to INformed Tokens, 2025 (arXiv:2501.12206)"

    alpha: float = help_field(0.7, "boost of local tokens: z + s*alpha*|z|")
    beta: float = help_field(0.3, "boost of summary tokens: z + s*beta*|z|")
    local_fraction: float = help_field(0.25, "share of image tokens that are local (top first-layer ViT attention)")
    summary_rule: str = help_field("iqr", "summary-token outlier rule: 'iqr' (Q3 + k*IQR, released code) or 'sigma'")
    summary_iqr: float = help_field(1.5, "'iqr' rule: penultimate-layer ViT attention > Q3 + summary_iqr * (Q3 - Q1)")
    summary_sigma: float = help_field(2.0, "'sigma' rule: penultimate-layer ViT attention > mean + sigma*std")
    head_sensitivity: bool = help_field(True, "scale the boost per head by its measured visual sensitivity")
    start_layer: int = help_field(2, "first edited decoder layer")
    end_layer: int = help_field(0, "one past the last edited layer; <= 0 counts from the depth (0 = last layer)")
    layers: tuple[int, ...] = help_field((), "explicit layer indices (overrides start_layer/end_layer)")

    def __post_init__(self):
        num = (int, float)
        self._check(isinstance(self.alpha, num) and self.alpha >= 0, "alpha", "a number >= 0")
        self._check(isinstance(self.beta, num) and self.beta >= 0, "beta", "a number >= 0")
        self._check(
            isinstance(self.local_fraction, num) and 0 <= self.local_fraction <= 1,
            "local_fraction",
            "a number in [0, 1]",
        )
        self._check(self.summary_rule in SUMMARY_RULES, "summary_rule", f"one of {SUMMARY_RULES}")
        self._check(isinstance(self.summary_iqr, num) and self.summary_iqr >= 0, "summary_iqr", "a number >= 0")
        self._check(isinstance(self.summary_sigma, num) and self.summary_sigma >= 0, "summary_sigma", "a number >= 0")
        self._check(isinstance(self.head_sensitivity, bool), "head_sensitivity", "True or False")
        check_layer_fields(self)

    def build(self) -> Method:
        return PAINTRuntime(self)


def vision_encoder_layers(vision_tower) -> torch.nn.ModuleList:
    """The encoder layers of a CLIP / SigLIP vision tower."""
    for name, module in vision_tower.named_modules():
        if name.endswith("encoder.layers") and isinstance(module, torch.nn.ModuleList):
            return module
    from vlmfix.errors import UnsupportedModelError

    raise UnsupportedModelError(f"paint: no encoder layers found in {type(vision_tower).__name__}")


def vit_token_scores(attn_module, hidden_states: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """Per-token ViT attention score ``[N, T]`` (fp32) from one attention layer's input.

    CLS towers: the CLS row's attention to each token, averaged over heads (CLS itself gets
    -inf). Towers without CLS: the mean attention each token receives over rows and heads.
    """
    x = hidden_states.float()
    N, T, _ = x.shape
    H, D = attn_module.num_heads, attn_module.head_dim
    q = attn_module.q_proj(hidden_states).float().view(N, T, H, D).transpose(1, 2)
    k = attn_module.k_proj(hidden_states).float().view(N, T, H, D).transpose(1, 2)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * float(attn_module.scale), dim=-1)  # [N, H, T, T]
    if has_cls:
        scores = probs[:, :, 0, :].mean(1)
        scores[:, 0] = float("-inf")
        return scores
    return probs.mean(dim=(1, 2))


class PAINTRuntime(Method):
    config: PAINT

    def __init__(self, config: PAINT):
        super().__init__(config)
        self.tracker = SequenceTracker()
        self.layers: frozenset[int] = frozenset()
        self._vit: dict[str, torch.Tensor] = {}
        self._image_sizes = None
        self.classes: torch.Tensor | None = None  # int8 [B, L]: 0 none, 1 local, 2 summary
        self._sens: dict[int, torch.Tensor] = {}
        self._counts = {"local": 0, "summary": 0, "image": 0}
        self._rows = 0
        self._boost: torch.Tensor | None = None
        self._boosted = 0
        self._any = False

    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        c = self.config
        self.layers = layer_set(c.layers, c.start_layer, c.end_layer, handle.controller.num_layers, c.name)
        tower = handle.adapter.get(handle.model, "vision_tower")
        self._has_cls = hasattr(getattr(tower, "embeddings", None), "class_embedding") or any(
            hasattr(m, "class_embedding") for m in tower.modules()
        )
        layers = vision_encoder_layers(tower)
        first, penult = 0, max(0, len(layers) - 2)
        for key, idx in (("first", first), ("penultimate", penult)):
            hook = layers[idx].self_attn.register_forward_pre_hook(self._vit_hook(key), with_kwargs=True)
            handle.add_hook(hook)

    def _vit_hook(self, key: str):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if x is not None:
                with torch.no_grad():
                    self._vit[key] = vit_token_scores(module, x, self._has_cls)
            return None

        return hook

    def on_forward(self, handle, kwargs: dict[str, Any]) -> None:
        self.tracker.update(handle, kwargs)
        # Stock ``generate`` encodes the image before the first forward (and passes no
        # ``image_sizes``), so ViT scores are kept until a new sequence consumes them.
        if self.tracker.new_sequence:
            self._sens = {}
            self.classes = None
            self._boost = None
            self._image_sizes = kwargs.get("image_sizes")

    # ------------------------------------------------------------------ token classes
    def _classify(self, layout) -> torch.Tensor:
        """int8 ``[B, L]`` token classes of the prompt from the captured ViT scores."""
        classes = torch.zeros(layout.labels.shape, dtype=torch.int8)
        if "first" not in self._vit or "penultimate" not in self._vit:
            return classes
        config = self.handle.model.config
        first, penult = self._vit.pop("first").cpu(), self._vit.pop("penultimate").cpu()
        image_mask = layout.image_mask.cpu()
        parts = layout.parts.cpu()
        runs = [(b, s, e) for b in range(layout.batch_size) for s, e in _image_runs(image_mask[b])]
        adapter = self.handle.adapter
        if self._image_sizes is not None:
            known = torch.as_tensor(self._image_sizes).tolist()
            sizes = [known[i] if i < len(known) else None for i in range(len(runs))]
            counts, grids = [_num_crops(config, adapter, size) for size in sizes], [None] * len(runs)
        else:
            sizes = [None] * len(runs)
            counts, grids = _infer_crop_grids(config, adapter, [parts[b, s:e] for b, s, e in runs], first.shape[0])
            if counts is None:
                logger.warning("paint: cannot locate each image's ViT crops without image_sizes; not boosted")
                return classes
            if any(g is None for g in grids):
                logger.info("paint: some any-res grids are ambiguous without image_sizes; their base grid only")
        crop = 0
        for i, (b, s, e) in enumerate(runs):
            n_crops = counts[i]
            run_parts = parts[b, s:e]
            s1 = _scores_for_run(config, first[crop : crop + n_crops], run_parts, sizes[i], self._has_cls, grids[i])
            s2 = _scores_for_run(config, penult[crop : crop + n_crops], run_parts, sizes[i], self._has_cls, grids[i])
            crop += n_crops
            if s1 is None or s2 is None:
                logger.warning("paint: image %d: could not map ViT tokens to LM tokens; not boosted", i)
                continue
            classes[b, s:e] = self._select(s1, s2)
        if self.tracker.new_sequence:
            self._counts["local"] += int((classes == LOCAL).sum())
            self._counts["summary"] += int((classes == SUMMARY).sum())
            self._counts["image"] += int(image_mask.sum())
        return classes

    def _select(self, first: torch.Tensor, penult: torch.Tensor) -> torch.Tensor:
        valid = torch.isfinite(first) & torch.isfinite(penult)
        out = torch.zeros(first.shape, dtype=torch.int8)
        n = int(valid.sum())
        if n == 0:
            return out
        k = int(round(self.config.local_fraction * n))
        if k:
            idx = torch.where(valid, first, torch.full_like(first, float("-inf"))).topk(k).indices
            out[idx] = LOCAL
        v = penult[valid].float()
        if self.config.summary_rule == "iqr":
            q1, q3 = torch.quantile(v, 0.25), torch.quantile(v, 0.75)
            thr = q3 + self.config.summary_iqr * (q3 - q1)
        else:
            thr = v.mean() + self.config.summary_sigma * v.std(correction=0)
        out[valid & (penult > thr)] = SUMMARY
        return out

    # ------------------------------------------------------------------ attention
    def wants_row_stats(self, call) -> bool:
        # The head's visual sensitivity: measured once per sequence, at the prefill, from the
        # last row's unedited attention.
        return (
            self.config.head_sensitivity
            and call.layer_idx in self.layers
            and call.is_prefill
            and self.tracker.new_sequence
            and call.layer_idx not in self._sens
        )

    def _prepare(self, layout, k_len: int) -> None:
        """Per sequence: the per-key boost ``alpha * 1[local] + beta * 1[summary]`` in a
        buffer as long as the layout's capacity (zeros past the prompt)."""
        c = self.config
        if self.classes is None:
            self.classes = self._classify(layout)
            self._boost = None
        if self._boost is None or self._boost.shape[1] < k_len:
            dev = layout.labels.device
            classes = self.classes.to(dev)
            boost = torch.zeros(classes.shape[0], max(layout.capacity, k_len), device=dev)
            n = min(classes.shape[1], boost.shape[1])
            boost[:, :n] = torch.where(classes[:, :n] == LOCAL, float(c.alpha), 0.0) + torch.where(
                classes[:, :n] == SUMMARY, float(c.beta), 0.0
            )
            self._boost = boost
            self._boosted = (classes > 0).any(-1).sum()  # samples with boosted keys (device)
            self._any = bool((classes > 0).any())  # once per sequence: a host check is fine here

    def contribute(self, call, plan) -> None:
        c = self.config
        if call.layer_idx not in self.layers or (c.alpha == 0 and c.beta == 0):
            return
        self._prepare(call.layout, call.k_len)
        rows = edit_rows(call, self.tracker)
        if rows is False or not self._any:
            return
        layer = call.layer_idx
        B = call.layout.batch_size
        if call.row_stats is not None and layer not in self._sens:
            image = call.layout.image_mask
            mass = (call.row_stats.probs * image[:, None, :]).sum(-1)  # [B, H]
            top = mass.amax(-1, keepdim=True)
            self._sens[layer] = torch.where(top > 0, mass / top.clamp_min(1e-30), torch.zeros_like(mass))
        if c.head_sensitivity:
            sens = self._sens.get(layer)
            if sens is None or sens.shape[0] != B:
                return
            gain = sens[:, :, None] * self._boost[:, None, : call.k_len]  # [B, H, Tk]
        else:
            gain = self._boost[:, None, : call.k_len]  # [B, 1, Tk]
        # accumulated on the device; read (one sync) only in stats()
        n_rows = call.q_len if rows is None else rows.sum()
        self._rows = accumulate(self._rows, n_rows * call.num_heads * self._boosted)
        plan.score_rows = rows if rows is None else rows.expand(B, -1)
        plan.add_score_edit(gain)

    def graph_state(self):
        from vlmfix.fastpath import GraphState

        # decode steps read the per-key boost, the heads' sensitivities and the boosted
        # sample count (all from the prefill) and add to the row counter
        tensors = {"rows": self._rows}
        if self._boost is not None:
            tensors.update(boost=self._boost, boosted=self._boosted)
        tensors.update({f"sens{layer}": t for layer, t in self._sens.items()})
        return GraphState(tensors=tensors, decisions=(self._any, self._boost is not None, tuple(sorted(self._sens))))

    def bind_graph_state(self, kept) -> None:
        t = kept.tensors
        if isinstance(t["rows"], torch.Tensor):
            self._rows = t["rows"]
        if "boost" in t:
            self._boost, self._boosted = t["boost"], t["boosted"]
        for layer in self._sens:
            self._sens[layer] = t[f"sens{layer}"]

    def stats(self) -> dict[str, Any]:
        return {
            "layers": sorted(self.layers),
            "local_tokens": self._counts["local"],
            "summary_tokens": self._counts["summary"],
            "image_tokens": self._counts["image"],
            "rows_touched": int(self._rows),
            "cls_scores": self._has_cls if self.handle is not None else None,
        }


# --------------------------------------------------------------------------- ViT -> LM tokens
def _image_runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of True in a 1-D bool tensor (one image each)."""
    runs, start = [], None
    for i, f in enumerate(flags.tolist() + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _num_crops(config, adapter, size) -> int:
    if adapter.grid == "single" or size is None:
        return 1
    from vlmfix._compat import image_size_to_num_patches

    return image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)


def _crop_features(scores: torch.Tensor, has_cls: bool, full: bool) -> torch.Tensor:
    """ViT token scores ``[T]`` -> scores of the features the projector receives."""
    if has_cls and not full:
        return scores[1:]
    return scores


def _grid_rows_cols(parts: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of an image's any-res grid from its token parts (``(0, 0)``: none)."""
    n_grid = int((parts == Part.GRID).sum())
    if n_grid == 0:
        return 0, 0
    rows = int((parts == Part.NEWLINE).sum())
    return rows, n_grid // max(rows, 1)


def _infer_crop_grids(config, adapter, run_parts: list[torch.Tensor], n_crops_total: int):
    """Crops per image and crop grids ``(nh, nw)`` when ``image_sizes`` is unknown.

    The any-res grid of an image is an ``nh x nw`` tiling of crops (a pinpoint), unpadded
    along one axis; its unpadded ``rows x cols`` is known from the layout. The pinpoints that
    fit each image, and the total number of crops the vision tower saw, usually pin down
    the crop counts (else ``counts`` is None) and most grids (an ambiguous grid, e.g. a
    square image that fits 1x2 and 2x1 alike, or a resized OneVision grid, is None).

    Returns:
        ``(counts, grids)``: crops per image (or None) and ``(nh, nw)`` or None per image.
    """
    if adapter.grid == "single":
        return [1] * len(run_parts), [(0, 0)] * len(run_parts)
    side = config.vision_config.image_size // config.vision_config.patch_size
    options = []
    for parts in run_parts:
        rows, cols = _grid_rows_cols(parts)
        if rows == 0:
            options.append([(0, 0)])
            continue
        fits = []
        for h, w in config.image_grid_pinpoints:
            nh, nw = h // config.vision_config.image_size, w // config.vision_config.image_size
            H, W = nh * side, nw * side
            exact = (rows == H and cols <= W and (W - cols) % 2 == 0) or (
                cols == W and rows <= H and (H - rows) % 2 == 0
            )
            if exact and (nh, nw) not in fits:
                fits.append((nh, nw))
        options.append(fits)
    solutions = [c for c in itertools.product(*options) if sum(1 + nh * nw for nh, nw in c) == n_crops_total]
    counts = {tuple(1 + nh * nw for nh, nw in c) for c in solutions}
    if len(counts) != 1:
        return None, [None] * len(run_parts)
    grids = [per_image[0] if len(set(per_image)) == 1 else None for per_image in zip(*solutions)]
    return list(counts.pop()), grids


def _scores_for_run(config, crops: torch.Tensor, parts: torch.Tensor, size, has_cls: bool, grid_shape=None):
    """Scores ``[n]`` for one image's ``n`` LM tokens (-inf at newline tokens), or None.

    The any-res grid is placed from ``size`` (the original image size) when known, else from
    ``grid_shape = (nh, nw)`` and the layout's unpadded rows x cols."""
    vcfg = config.vision_config
    side = vcfg.image_size // vcfg.patch_size
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    out = torch.full((parts.shape[0],), float("-inf"))
    base_pos = (parts == Part.BASE).nonzero()[:, 0]
    grid_pos = (parts == Part.GRID).nonzero()[:, 0]
    if crops.shape[0] < 1:
        return None
    base = _crop_features(crops[0], has_cls, full)
    if base.shape[0] != base_pos.shape[0]:
        return None
    out[base_pos] = base
    if grid_pos.numel() == 0:
        return out
    if crops.shape[0] < 2:
        return None
    if size is None and grid_shape is None:
        return out  # grid unknown: the base grid alone is classified
    from vlmfix._compat import anyres_grid_shape, unpad_image

    patches = torch.stack([_crop_features(c, has_cls, False)[-side * side :] for c in crops[1:]])
    if size is not None:
        nh, nw = anyres_grid_shape(size, config.image_grid_pinpoints, vcfg.image_size)
    else:
        nh, nw = grid_shape
    if patches.shape[0] != nh * nw:
        return None
    grid = patches.view(nh, nw, side, side).permute(0, 2, 1, 3).reshape(1, nh * side, nw * side)
    if size is not None:
        grid = unpad_image(grid, size)
    else:  # unpadding removes the same number of rows (or cols) on both sides
        rows, cols = _grid_rows_cols(parts)
        top, left = (nh * side - rows) // 2, (nw * side - cols) // 2
        grid = grid[:, top : top + rows, left : left + cols]
    aspect = getattr(config, "vision_aspect_ratio", None)
    if aspect is not None and str(aspect).startswith("anyres_max_"):
        max_crops = int(str(aspect).split("_")[-1])
        h, w = grid.shape[-2:]
        ratio = math.sqrt(h * w / (max_crops * side * side))
        if ratio > 1.1:
            size_new = [int(h // ratio), int(w // ratio)]
            grid = torch.nn.functional.interpolate(grid[None], size_new, mode="bilinear")[0]
    flat = grid[0].reshape(-1)
    if flat.shape[0] != grid_pos.shape[0]:
        return None
    out[grid_pos] = flat
    return out
