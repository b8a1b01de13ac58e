"""VHR: Vision-aware Head Reinforcement, and the VHD head metric (He et al., ACL 2025).

"Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence".

VHD of head ``h`` in layer ``l`` is ``||A_lh(image) - A_lh(no image)||_2``, where ``A_lh`` is
that head's attention output (before ``o_proj``) at the last prompt row, i.e. the row that
produces the first generated token. Per sample and layer, heads whose VHD *and* squared
image-free output norm both exceed the layer's mean + std (population std) are treated as
outliers and get VHD 0; then heads whose VHD is above the layer median (``torch.quantile``
0.5) have their output multiplied by ``alpha = 2`` in layers ``{1} ∪ last 14`` (of 32; the
"last 14" scales to ``round(14 * N / 32)`` for other depths). Heads are chosen once per
sequence, at the first generated token, and reused at every later step; the selected heads
are scaled at every query row, prompt rows included (so decoding with the KV cache on and
off agree).

Two ways to get ``A(no image)`` (``mode``):

* ``"forward"`` (the paper): two extra LM forwards at the start of each sequence on the same
  LM input embeddings: one unchanged (``A(image)``, with VHR itself inactive, other attached
  methods active) and one with the image embeddings removed and the prompt re-left-padded
  and re-positioned (``A(no image)``). Costs two prefills, no vision-tower recompute.
* ``"one_pass"``: inside the same attention call, the last row attends once more over the
  text keys only (image keys masked); ``A(image)`` is the call's own output. No extra
  forward, but the text tokens still saw the image in earlier layers, and earlier layers'
  reinforcement is already in effect. ``docs/methods.md`` reports how far the two differ.

:func:`vhd` returns the raw VHD matrix ``[layers, heads]`` of one (image, prompt).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmfix.layout import text_layout
from vlmfix.methods import register
from vlmfix.methods._attn_utils import SequenceTracker, layer_set
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["VHR", "VHRRuntime", "vhd", "default_vhr_layers", "select_heads"]

logger = logging.getLogger(__name__)

MODES = ("forward", "one_pass")


def default_vhr_layers(num_layers: int) -> list[int]:
    """Layer 1 and the last ``round(14 * N / 32)`` layers (the paper's {1} ∪ 18..31 at N=32)."""
    last = max(1, round(14 * num_layers / 32))
    return sorted({min(1, num_layers - 1)} | set(range(num_layers - last, num_layers)))


def select_heads(vhd: torch.Tensor, noimg_sq: torch.Tensor, outlier_filter: bool = True) -> torch.Tensor:
    """Heads to reinforce, per sample and layer.

    Args:
        vhd: ``[..., H]`` VHD per head.
        noimg_sq: ``[..., H]`` squared norm of the image-free head output.
        outlier_filter: zero the VHD of heads where both VHD and ``noimg_sq`` exceed the
            mean + std over heads.

    Returns:
        Bool ``[..., H]``: VHD (after the filter) strictly above the median over heads.
    """
    vhd = vhd.float()
    if outlier_filter:
        noimg_sq = noimg_sq.float()
        big_v = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, correction=0, keepdim=True)
        big_n = noimg_sq > noimg_sq.mean(-1, keepdim=True) + noimg_sq.std(-1, correction=0, keepdim=True)
        vhd = vhd.masked_fill(big_v & big_n, 0.0)
    return vhd > vhd.quantile(0.5, dim=-1, keepdim=True)


@register
@dataclass(frozen=True)
class VHR(MethodConfig):
    """Scale the outputs of vision-aware heads (high VHD) by ``alpha``.

    Args:
        alpha: output scale of the selected heads (1 changes nothing).
        mode: ``"forward"`` (paper: image-free forward) or ``"one_pass"`` (image keys
            masked inside the same attention call).
        layers: reinforced layers; empty = ``{1} ∪`` the last ``round(14 N / 32)``.
        outlier_filter: zero VHD of heads that are outliers in both VHD and image-free norm.

    Example:
        >>> with vlmfix.attach(model, vlmfix.VHR(alpha=2.0)) as h:  # doctest: +SKIP
        ...     model.generate(**inputs)
        ...     h.stats()["vhr"]["heads_selected_per_layer"]
    """

    name: ClassVar[str] = "vhr"
    order: ClassVar[int] = 240
    paper: ClassVar[str] = (
        "He et al., Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence, ACL 2025"
    )

    alpha: float = help_field(2.0, "output scale of the selected (vision-aware) heads")
    mode: str = help_field("forward", "how A(no image) is obtained: 'forward' (paper) or 'one_pass'")
    layers: tuple[int, ...] = help_field((), "reinforced layers; empty = {1} + last round(14*N/32)")
    outlier_filter: bool = help_field(True, "zero VHD of heads that are outliers in VHD and in image-free norm")

    def __post_init__(self):
        self._check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", "a number > 0")
        self._check(self.mode in MODES, "mode", f"one of {MODES}")
        self._check(
            isinstance(self.layers, tuple) and all(isinstance(i, int) for i in self.layers),
            "layers",
            "a tuple of ints, e.g. (1, 30, 31)",
        )
        self._check(isinstance(self.outlier_filter, bool), "outlier_filter", "True or False")

    def build(self) -> Method:
        return VHRRuntime(self)


class VHRRuntime(Method):
    """Runtime of :class:`VHR`.

    Attributes:
        last_vhd: ``[B, L, H]`` raw VHD of the current sequence (fp32), once measured.
        selected: bool ``[B, L, H]``, the reinforced heads of the current sequence.
    """

    config: VHR

    def __init__(self, config: VHR):
        super().__init__(config)
        self.tracker = SequenceTracker()
        self.layers: frozenset[int] = frozenset()
        self.last_vhd: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None
        self._noimg_sq: torch.Tensor | None = None
        self._probe: str | None = None
        self._probe_out: dict[int, torch.Tensor] = {}
        self._heads: dict[int, int] = {}
        self._sequences = 0

    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        n = handle.controller.num_layers
        c = self.config
        self.layers = layer_set(c.layers, 0, 0, n, c.name) if c.layers else frozenset(default_vhr_layers(n))
        if c.mode == "forward":
            lm = handle.adapter.get(handle.model, "language_model")
            handle.add_hook(lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True))

    def on_forward(self, handle, kwargs: dict[str, Any]) -> None:
        self.tracker.update(handle, kwargs)
        if self.tracker.new_sequence:
            self.selected = None
            self.last_vhd = None
            self._noimg_sq = None
            self._sequences += 1

    # ------------------------------------------------------------------ measuring
    def _start(self, B: int, H: int, device) -> None:
        L = self.handle.controller.num_layers
        self.last_vhd = torch.zeros(B, L, H, device=device)
        self._noimg_sq = torch.zeros(B, L, H, device=device)
        self.selected = torch.zeros(B, L, H, dtype=torch.bool, device=device)

    def _measure_layer(self, layer: int, a_img: torch.Tensor, a_txt: torch.Tensor) -> None:
        """Record VHD of one layer from head outputs ``[B, H, D]`` and select its heads."""
        if self.last_vhd is None:
            self._start(a_img.shape[0], a_img.shape[1], a_img.device)
        vhd = (a_img.float() - a_txt.float()).norm(dim=-1)
        sq = a_txt.float().pow(2).sum(-1)
        self.last_vhd[:, layer] = vhd
        self._noimg_sq[:, layer] = sq
        if layer in self.layers:
            sel = select_heads(vhd, sq, self.config.outlier_filter)
            self.selected[:, layer] = sel
            self._heads[layer] = int(sel.sum())

    def _lm_pre_hook(self, module, args, kwargs):
        ctrl = self.handle.controller
        if self._probe is not None or not ctrl.is_prefill or not self.tracker.new_sequence:
            return None
        embeds = kwargs.get("inputs_embeds")
        layout = ctrl.layout
        if embeds is None or layout is None or layout.length != embeds.shape[1]:
            logger.warning("vhr: no input embeddings aligned with the image layout; no heads reinforced")
            return None
        mask = kwargs.get("attention_mask")
        mask2d = mask if mask is not None and mask.dim() == 2 else torch.ones(embeds.shape[:2], device=embeds.device)
        a_img = self._run_probe(module, "image", ctrl.layout, embeds, mask, kwargs.get("position_ids"))
        keep = mask2d.bool() & ~layout.image_mask.to(embeds.device)
        txt_embeds, txt_mask, txt_pos = _left_pack(embeds, keep)
        a_txt = self._run_probe(module, "text", text_layout(txt_mask), txt_embeds, txt_mask, txt_pos)
        for layer in sorted(a_img):
            self._measure_layer(layer, a_img[layer], a_txt[layer])
        return None

    def _run_probe(self, lm, kind: str, layout, embeds, mask, position_ids) -> dict[int, torch.Tensor]:
        """One forward of the language model in which only VHR acts, recording the last
        row's head outputs of every layer (unedited, from :class:`~vlmfix.plan.RowStats`)."""
        ctrl = self.handle.controller
        saved = (ctrl.layout, ctrl.state)
        ctrl.layout, ctrl.state = layout, {}
        self._probe, self._probe_out = kind, {}
        try:
            with torch.no_grad(), ctrl.only([self]):
                lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
            return self._probe_out
        finally:
            ctrl.layout, ctrl.state = saved
            self._probe = None

    # ------------------------------------------------------------------ attention
    def _measuring_one_pass(self, call) -> bool:
        return self.config.mode == "one_pass" and call.is_prefill and self.tracker.new_sequence

    def wants_row_stats(self, call) -> bool:
        return self._probe is not None or self._measuring_one_pass(call)

    def contribute(self, call, plan) -> None:
        if self._probe is not None:
            return
        if self._measuring_one_pass(call) and call.row_stats is not None:
            self._measure_layer(call.layer_idx, call.row_stats.out, call.row_stats.out_text)
        if (
            call.layer_idx not in self.layers
            or self.selected is None
            or self.selected.shape[0] != call.layout.batch_size
        ):
            return
        sel = self.selected[:, call.layer_idx]  # [B, H]
        plan.scale_heads(torch.where(sel, float(self.config.alpha), 1.0))

    def graph_state(self):
        from vlmfix.fastpath import GraphState

        # decode steps scale the heads selected at the prefill
        return GraphState(tensors={} if self.selected is None else {"selected": self.selected})

    def bind_graph_state(self, kept) -> None:
        if "selected" in kept.tensors:
            self.selected = kept.tensors["selected"]

    def observe(self, call, plan, result) -> None:
        if self._probe is not None and result.row_stats is not None:
            self._probe_out[call.layer_idx] = result.row_stats.out

    def stats(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode,
            "layers": sorted(self.layers),
            "heads_selected_per_layer": {str(k): v for k, v in sorted(self._heads.items())},
            "sequences": self._sequences,
        }


def _left_pack(embeds: torch.Tensor, keep: torch.Tensor):
    """Keep the ``keep`` positions of each row, left-padded to a common length.

    Returns:
        ``(embeds[B, L', E], mask[B, L'], position_ids[B, L'])``.
    """
    B, _, E = embeds.shape
    counts = keep.sum(-1)
    Lp = max(int(counts.max()), 1)
    out = embeds.new_zeros(B, Lp, E)
    mask = torch.zeros(B, Lp, dtype=torch.long, device=embeds.device)
    for b in range(B):
        n = int(counts[b])
        if n:
            out[b, Lp - n :] = embeds[b, keep[b]]
            mask[b, Lp - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return out, mask, pos


def vhd(model, processor, image, prompt: str, *, mode: str = "forward", apply_chat_template: bool = True):
    """The VHD matrix of one (image, prompt): ``[layers, heads]`` fp32 on the CPU.

    Args:
        model, processor: from :func:`vlmfix.load`.
        image: a PIL image or a path.
        prompt: the user prompt (chat template applied unless ``apply_chat_template=False``).
        mode: ``"forward"`` (paper: image-free forward) or ``"one_pass"``.

    Returns:
        ``||A_lh(image) - A_lh(no image)||_2`` at the last prompt row, before any filtering.

    Example:
        >>> m = vlmfix.vhd(model, processor, "cat.jpg", "Describe the image.")  # doctest: +SKIP
        >>> m.shape  # (num_layers, num_heads)  # doctest: +SKIP
    """
    from vlmfix.attachment import attach
    from vlmfix.generation import prepare_inputs
    from vlmfix.loading import input_device

    device = input_device(model)
    dtype = next(model.parameters()).dtype
    inputs = prepare_inputs(
        processor, [image], [prompt], apply_chat_template=apply_chat_template, device=device, dtype=dtype
    )
    cfg = VHR(alpha=1.0, mode=mode)
    with attach(model, cfg) as handle, torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
        runtime = handle.methods[0]
        result = runtime.last_vhd
    if result is None:
        raise RuntimeError("vhd: the forward produced no head outputs")  # pragma: no cover
    return result[0].cpu()
