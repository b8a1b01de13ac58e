"""VISTA: Visual Information Steering with Token-logit Augmentation (Li et al., ICML 2025,
arXiv:2502.03628; released code ``LzVv123456/VISTA``).

Two halves, each off when its strength is 0:

* **VSV** (visual steering vector). Once per sequence, the last prompt token's output of
  every decoder layer ``i`` is read with the image (``h_i^+``) and with the same prompt
  without the image (``h_i^-``); ``v_i = h_i^+ - h_i^-``. Then, in every forward, layer
  ``i``'s MLP output ``x`` (every position) becomes
  ``normalize(normalize(x) + lambda * (1 + max(0, cos(x, -v_i))) * normalize(v_i)) * ||x||``.
* **SLA** (self-logits augmentation). The next-token logits are mixed with the mean of
  the early-exit logits of layers ``25..30`` (of 32):
  ``alpha * mean_l lm_head(h_l) + (1 - alpha) * logits``.

Both read hidden states of the forward they act on (scoped hooks). The two VSV reads ride
as rows of one extra forward before the prefill (the main rows and image-free rows, see
:attr:`vlmfix.branches.BranchSpec.probe_only`); decoding stays one forward per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vlmfix.branches import BranchSpec
from vlmfix.errors import StateError
from vlmfix.methods import register
from vlmfix.methods._hidden import LayerOutputs, depth_scaled_layers, early_exit_logits
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["VISTA", "steer"]


def steer(x: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """VISTA's steering of one layer's MLP output.

    Args:
        x: ``[B, T, D]`` MLP output.
        v: ``[B, D]`` steering direction of each row.
        lam: strength ``lambda``.

    Returns:
        ``normalize(normalize(x) + lam * (1 + max(0, cos(x, -v))) * normalize(v)) * ||x||`` in
        ``x``'s dtype (computed in fp32).
    """
    xf, vf = x.float(), v.float()[:, None, :]
    norm = xf.norm(dim=-1, keepdim=True)
    similarity = 1 + F.cosine_similarity(xf, -vf, dim=-1).clamp(min=0)  # [B, T]
    y = lam * similarity[..., None] * F.normalize(vf, dim=-1)
    return (F.normalize(F.normalize(xf, dim=-1) + y, dim=-1) * norm).to(x.dtype)


@register
@dataclass(frozen=True)
class VISTA(MethodConfig):
    """Visual steering vector + self-logits augmentation.

    Defaults are the released LLaVA-1.5 CHAIR settings (``run_chair.sh``: ``vsv_lambda=0.17``,
    ``logits_alpha=0.3``, ``logits_layers=25,30``); the POPE script uses ``vsv_lambda=0.01``
    (``configs/methods/vista_pope.yaml``). Layers are 0-based decoder-layer indices, stated
    for a 32-layer LM and mapped to other depths (see ``docs/methods.md``). The VSV needs
    :func:`vlmfix.generate` (it measures the image-free prompt); SLA also works around a plain
    ``model.generate`` while attached. Deviations from the released code are listed in
    ``docs/methods.md``.
    """

    name: ClassVar[str] = "vista"
    order: ClassVar[int] = 250
    paper: ClassVar[str] = "https://arxiv.org/abs/2502.03628"

    vsv_lambda: float = help_field(0.17, "VSV strength lambda (0 turns the steering vector off)")
    vsv_layers: tuple[int, ...] = help_field((), "layers whose MLP output is steered (empty: every layer)")
    sla_alpha: float = help_field(0.3, "SLA mix: alpha * mean early-exit logits + (1 - alpha) * logits (0: off)")
    sla_start_layer: int = help_field(25, "first SLA layer (0-based decoder layer, for a 32-layer LM)")
    sla_end_layer: int = help_field(31, "one past the last SLA layer (for a 32-layer LM)")
    sla_layers: tuple[int, ...] = help_field((), "explicit SLA layers (overrides sla_start/end_layer)")
    sla_final_norm: bool = help_field(False, "apply the LM's final norm before lm_head for SLA (released code: no)")

    def __post_init__(self):
        self._check(self.vsv_lambda >= 0, "vsv_lambda", ">= 0")
        self._check(0 <= self.sla_alpha <= 1, "sla_alpha", "in [0, 1]")
        self._check(
            self.vsv_lambda > 0 or self.sla_alpha > 0, "vsv_lambda", "> 0 when sla_alpha is 0 (else VISTA does nothing)"
        )
        self._check(
            isinstance(self.sla_start_layer, int) and self.sla_start_layer >= 0, "sla_start_layer", "an int >= 0"
        )
        self._check(
            isinstance(self.sla_end_layer, int) and self.sla_end_layer > self.sla_start_layer,
            "sla_end_layer",
            "> sla_start_layer",
        )
        for name in ("vsv_layers", "sla_layers"):
            value = getattr(self, name)
            self._check(isinstance(value, tuple) and all(isinstance(i, int) for i in value), name, "a tuple of ints")

    def build(self) -> Method:
        return VISTAMethod(self) if self.vsv_lambda > 0 else SLAOnlyMethod(self)


class SLAOnlyMethod(Method):
    """VISTA's self-logits augmentation: a forward hook on ``lm_head`` mixes the early-exit
    logits of the same forward into the logits of every row (as the released code does
    inside the model's forward)."""

    def __init__(self, config: VISTA):
        super().__init__(config)
        self._sla: LayerOutputs | None = None

    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        cfg = self.config
        if cfg.sla_alpha > 0:
            depth = len(handle.adapter.decoder_layers(handle.model))
            layers = depth_scaled_layers(
                cfg.sla_layers, cfg.sla_start_layer, cfg.sla_end_layer, depth, f"{cfg.name} (sla_layers)"
            )
            self._sla = LayerOutputs(handle, layers)
            head = handle.adapter.get(handle.model, "lm_head")
            handle.add_hook(head.register_forward_hook(self._mix_logits))

    def on_detach(self) -> None:
        self._sla = None
        super().on_detach()

    def _mix_logits(self, module, args, logits):
        rows = self.handle.controller.rows if self.handle is not None else None
        if rows is not None and rows.probing:
            return None
        cfg, sla = self.config, self._sla
        n = logits.shape[1]
        early = [early_exit_logits(self.handle, sla.get(i)[:, -n:], cfg.sla_final_norm) for i in sla.layers]
        mixed = cfg.sla_alpha * torch.stack(early).mean(0) + (1 - cfg.sla_alpha) * logits.float()
        sla.clear()
        return mixed.to(logits.dtype)


class VISTAMethod(SLAOnlyMethod):
    """SLA plus the visual steering vector (needs :func:`vlmfix.generate`)."""

    BRANCH = "no_image"

    def __init__(self, config: VISTA):
        super().__init__(config)
        self._vsv: dict[int, torch.Tensor] = {}
        self._steered: list[int] = []

    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        cfg = self.config
        decoder = handle.adapter.decoder_layers(handle.model)
        depth = len(decoder)
        layers = list(range(depth))
        if cfg.vsv_layers:
            layers = depth_scaled_layers(cfg.vsv_layers, 0, depth, depth, f"{cfg.name} (vsv_layers)")
        self._steered = layers
        for i in layers:
            mlp = decoder[i].get_submodule(handle.adapter.layer_mlp)
            handle.add_hook(decoder[i].register_forward_hook(self._measure(i)))
            handle.add_hook(mlp.register_forward_hook(self._steer(i)))

    def branches(self) -> tuple[BranchSpec, ...]:
        self._vsv = {}  # a new generate() call: new prompts, new vectors
        return (BranchSpec(self.BRANCH, with_image=False, probe_only=True),)

    def _measure(self, i: int):
        def hook(module, args, output):
            rows = self.handle.controller.rows
            if rows is None or not rows.probing:
                return None
            h = (output[0] if isinstance(output, tuple) else output)[:, -1, :].float()
            k = rows.branches.index((self.name, self.BRANCH))
            self._vsv[i] = h[rows.main_rows] - h[rows.branch_rows(k)]
            return None

        return hook

    def _steer(self, i: int):
        def hook(module, args, output):
            rows = self.handle.controller.rows
            if rows is None or rows.probing:
                return None
            if i not in self._vsv:
                raise StateError(
                    f"{self.name}: no steering vector for layer {i}; VISTA's VSV measures the image-free prompt "
                    "in vlmfix.generate's probe forward (set vsv_lambda=0 to use SLA alone)"
                )
            if output.shape[0] != rows.num_rows:
                raise StateError(
                    f"{self.name}: a forward of {output.shape[0]} rows inside vlmfix.generate, which runs "
                    f"{rows.num_rows} rows; VISTA steers vlmfix.generate's own forwards only"
                )
            v = self._vsv[i][rows.sample_index(output.device)]  # every row of a sample: its vector
            return steer(output, v, self.config.vsv_lambda)

        return hook

    def stats(self):
        if not self._vsv:
            return {}
        norms = torch.stack([self._vsv[i].norm(dim=-1).cpu() for i in sorted(self._vsv)])  # [layers, B]
        return {"vsv_norm_mean": norms.mean(0).tolist()}
