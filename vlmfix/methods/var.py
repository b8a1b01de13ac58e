"""VAR: Visual Attention Redistribution (Kang et al., "See What You Are Told", ICLR 2025).

Sink tokens. At each edited layer ``l``, a key position is a sink when
``phi(x) = max_{d in D} |RMSNorm(x)[d]| > tau`` on the layer's *input* hidden state ``x``
(``tau = 20``). ``RMSNorm`` here is the parameter-free normalisation
``x / sqrt(mean(x^2) + 1e-6)``, as in the released code: the massive activations that mark
sinks live in the residual stream, and the layer's learned gain would rescale ``tau``
differently per model. ``D`` is the pair of
"massive activation" dimensions of the LM: ``{2533, 1415}`` for LLaMA-2-7B LMs (hidden
4096, 32 layers: LLaVA-1.5-7B, LLaVA-NeXT-Vicuna-7B) and ``{2100, 4743}`` for LLaMA-2-13B
LMs (hidden 5120, 40 layers). For any other LM ``D`` is discovered per sample and layer:
the ``num_dims`` largest ``|RMSNorm(x)|`` dims of the sample's first token (the BOS, the
canonical sink). The dims used are reported in ``stats()["dims"]``.

Row selection, per (sample, head, query row), on the post-softmax probabilities ``P``:
image mass ``P_img >= min_image_mass`` (0.2), visual-sink share ``P_sink / P_img <= rho``
(0.5), and the row at or after the end of the image.

Redistribution in a selected row (DESIGN §5): ``c_sink = p`` (0.6),
``c_image_nonsink = 1 + (1 - p) * P_sink / P_image_nonsink``, ``c_text = 1``; the row still
sums to one.

Layers: 2..30 of 32 (``start_layer=2, end_layer=-1``), i.e. the last layer is skipped as in
the paper; the released code also edits the last layer (set ``end_layer=0`` for that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmfix.layout import Label
from vlmfix.methods import register
from vlmfix.methods._attn_utils import (
    DecodeRowCount,
    accumulate,
    check_layer_fields,
    layer_set,
    rms_normalise,
)
from vlmfix.methods.base import Method, MethodConfig, help_field
from vlmfix.plan import Reweight

__all__ = ["VAR", "VARRuntime", "KNOWN_SINK_DIMS", "known_sink_dims", "scaled_tau"]

logger = logging.getLogger(__name__)
_WARNED_TAU: set[tuple[float, int]] = set()

RMS_EPS = 1e-6  # the released code's eps; tau was calibrated with it

# (text model_type, hidden size, layers) -> massive-activation dims (Sun et al., 2024).
KNOWN_SINK_DIMS: dict[tuple[str, int, int], tuple[int, ...]] = {
    ("llama", 4096, 32): (2533, 1415),
    ("llama", 5120, 40): (2100, 4743),
}


def known_sink_dims(text_config) -> tuple[int, ...]:
    """The tabulated massive-activation dims of a text config, or ``()`` when unknown."""
    key = (
        getattr(text_config, "model_type", ""),
        int(getattr(text_config, "hidden_size", 0)),
        int(getattr(text_config, "num_hidden_layers", 0)),
    )
    return KNOWN_SINK_DIMS.get(key, ())


def scaled_tau(hidden_size: int, tau: float = 20.0) -> float:
    """``tau`` rescaled to a hidden size: ``tau * sqrt(hidden_size / 4096)``.

    ``|RMSNorm(x)[d]| <= sqrt(hidden_size)``, so the paper's ``tau = 20`` (LLaMA-2-7B, hidden
    4096) can never fire below hidden 400. This keeps ``tau``'s share of that bound. It is
    a suggestion for small LMs (printed in VAR's attach warning), never applied by itself:
    massive activations come from training, not from the width.

    Example:
        >>> round(scaled_tau(256), 2)
        5.0
    """
    return tau * (hidden_size / 4096) ** 0.5


@register
@dataclass(frozen=True)
class VAR(MethodConfig):
    """Move attention from visual sink tokens to the other image tokens.

    Args:
        p: fraction of the sink attention kept in a selected row (1 changes nothing).
        rho: a row is selected only if sinks hold at most this share of its image mass.
        min_image_mass: a row is selected only if it puts at least this mass on the image.
        tau: sink threshold on ``max_{d in D} |RMSNorm(x)[d]|``.
        dims: massive-activation dims ``D``; empty = the known table, else discovery.
        num_dims: how many dims discovery picks from the BOS token.
        start_layer, end_layer: edited layers ``start_layer .. end_layer - 1``; ``end_layer
            <= 0`` counts from the depth (``-1``: skip the last layer, as the paper does).
        layers: explicit layer indices; overrides ``start_layer`` / ``end_layer``.

    Example:
        >>> out = vlmfix.generate(model, processor, [img], ["Describe."], methods=[vlmfix.VAR()])  # doctest: +SKIP
        >>> out.stats["var"]["rows_redistributed_fraction"]  # doctest: +SKIP
    """

    name: ClassVar[str] = "var"
    order: ClassVar[int] = 220
    paper: ClassVar[str] = "Kang et al., See What You Are Told: Visual Attention Sink in LMMs, ICLR 2025"

    p: float = help_field(0.6, "fraction of sink attention kept in selected rows")
    rho: float = help_field(0.5, "max visual-sink share of the image mass for a row to be selected")
    min_image_mass: float = help_field(0.2, "min attention mass on the image for a row to be selected")
    tau: float = help_field(20.0, "sink threshold on max_{d in D} |RMSNorm(x)[d]|")
    dims: tuple[int, ...] = help_field((), "massive-activation dims D; empty = known table, else discovered")
    num_dims: int = help_field(2, "number of dims discovered from the BOS token when D is unknown")
    start_layer: int = help_field(2, "first edited decoder layer")
    end_layer: int = help_field(-1, "one past the last edited layer; <= 0 counts from the depth (-1 skips the last)")
    layers: tuple[int, ...] = help_field((), "explicit layer indices (overrides start_layer/end_layer)")

    def __post_init__(self):
        num = (int, float)
        self._check(isinstance(self.p, num) and 0 <= self.p <= 1, "p", "a number in [0, 1]")
        self._check(isinstance(self.rho, num) and 0 <= self.rho <= 1, "rho", "a number in [0, 1]")
        self._check(
            isinstance(self.min_image_mass, num) and 0 <= self.min_image_mass <= 1,
            "min_image_mass",
            "a number in [0, 1]",
        )
        self._check(isinstance(self.tau, num) and self.tau > 0, "tau", "a number > 0")
        self._check(
            isinstance(self.dims, tuple) and all(isinstance(d, int) and d >= 0 for d in self.dims),
            "dims",
            "a tuple of hidden-dimension indices >= 0, e.g. (2533, 1415), or () for automatic",
        )
        self._check(isinstance(self.num_dims, int) and self.num_dims >= 1, "num_dims", "an int >= 1")
        check_layer_fields(self)

    def build(self) -> Method:
        return VARRuntime(self)


class VARRuntime(Method):
    config: VAR

    def __init__(self, config: VAR):
        super().__init__(config)
        self.layers: frozenset[int] = frozenset()
        self.fixed_dims: tuple[int, ...] = ()
        self._rows_total = 0
        self._rows_selected = 0
        self._sinks: dict[int, torch.Tensor] = {}
        self._decode_rows = DecodeRowCount()
        self._dims_seen: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ setup
    def on_attach(self, handle) -> None:
        super().on_attach(handle)
        c = self.config
        ctrl = handle.controller
        self.layers = layer_set(c.layers, c.start_layer, c.end_layer, ctrl.num_layers, c.name)
        text_config = handle.adapter.text_config(handle.model)
        hidden = int(text_config.hidden_size)
        self.fixed_dims = c.dims or known_sink_dims(text_config)
        bad = [d for d in self.fixed_dims if d >= hidden]
        if bad:
            from vlmfix.errors import ConfigError

            raise ConfigError(f"var: dims={self.fixed_dims!r} has {bad} >= hidden_size {hidden}; pass dims below it")
        if c.tau >= hidden**0.5 and (c.tau, hidden) not in _WARNED_TAU:
            _WARNED_TAU.add((c.tau, hidden))  # once per process: generate() attaches per batch
            # |RMSNorm(x)[d]| <= sqrt(hidden) for every token: no sink can ever be found.
            # tau stays as given (a silent rescale would hide that the paper's value is
            # meaningless here); the message suggests tau at the 7B model's share of the
            # bound (20 / sqrt(4096)), a starting point, not a calibrated value.
            logger.warning(
                "var: tau=%s can never be exceeded with hidden_size=%d (|RMSNorm(x)[d]| <= %.1f); "
                "no sinks will be found and VAR changes nothing (stats report 0 sinks per layer): "
                "pass a smaller tau for this model, e.g. tau=%.1f (20 * sqrt(hidden_size / 4096))",
                c.tau,
                hidden,
                hidden**0.5,
                scaled_tau(hidden),
            )
        layers = handle.adapter.decoder_layers(handle.model)
        for idx in sorted(self.layers):
            hook = layers[idx].register_forward_pre_hook(self._layer_input_hook(idx), with_kwargs=True)
            handle.add_hook(hook)

    def _layer_input_hook(self, idx: int):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if x is not None:
                self._record_sinks(idx, x)
            return None

        return hook

    # ------------------------------------------------------------------ sinks
    def _record_sinks(self, idx: int, x: torch.Tensor) -> None:
        """Write per-position sink flags of layer ``idx`` into its ``[B, capacity]`` buffer:
        every position at a prefill, the new positions at a decode step (no growth, no sync)."""
        ctrl = self.handle.controller
        if not ctrl.is_prefill:
            # A decode step adds generated (text) tokens; VAR moves mass only from image
            # sinks, all known since the prefill, so there is nothing to measure per step.
            return
        state = ctrl.layer_state(idx)
        h = rms_normalise(x, RMS_EPS)  # [B, T, E]
        B, T, _ = h.shape
        if ctrl.is_prefill or "var_dims" not in state:
            if self.fixed_dims:
                dims = torch.tensor(self.fixed_dims, device=h.device).expand(B, -1)
            else:
                dims = self._discover(h, ctrl.layout_for(idx))
            state["var_dims"] = dims
            self._dims_seen[idx] = dims[0].tolist()  # prefill only: one sync per sequence
        dims = state["var_dims"]
        phi = h.gather(-1, dims[:, None, :].expand(B, T, dims.shape[-1])).abs().amax(-1)  # [B, T]
        sink = phi > self.config.tau
        layout = ctrl.layout_for(idx)  # the keys this layer holds (fewer under token pruning)
        length = layout.length if layout is not None else T
        buf = state.get("var_sink")
        if ctrl.is_prefill or buf is None or buf.shape[1] < length:
            old = buf
            cap = max(length, layout.capacity if layout is not None else length)
            buf = torch.zeros(B, cap, dtype=torch.bool, device=h.device)
            if old is not None and not ctrl.is_prefill:
                buf[:, : old.shape[1]] = old
            state["var_sink"] = buf
        buf[:, length - T : length] = sink

    def _discover(self, h: torch.Tensor, layout) -> torch.Tensor:
        """Per sample, the ``num_dims`` largest ``|h|`` dims of its first non-pad token."""
        B = h.shape[0]
        if layout is not None and layout.length == h.shape[1]:
            first = (~layout.pad_mask).to(torch.int8).argmax(-1).to(h.device)
        else:
            first = torch.zeros(B, dtype=torch.long, device=h.device)
        bos = h[torch.arange(B, device=h.device), first]  # [B, E]
        k = min(self.config.num_dims, h.shape[-1])
        return bos.abs().topk(k, dim=-1).indices

    def reorder_rows(self, index: torch.Tensor) -> None:
        # sink flags of generated positions follow their beam (prompt flags are equal anyway)
        for state in self.handle.controller.state.values():
            for key in ("var_sink", "var_dims"):
                if key in state:
                    state[key] = state[key].index_select(0, index.to(state[key].device))

    # ------------------------------------------------------------------ attention
    def contribute(self, call, plan) -> None:
        if call.layer_idx not in self.layers:
            return
        state = call.controller.layer_state(call.layer_idx)
        c = self.config
        if call.is_prefill:
            buf = state.get("var_sink")
            if buf is None or buf.shape[1] < call.k_len:
                return
            self._prepare(state, call)
            first = call.k_len - call.q_len
            end = call.layout.image_end
            qidx = torch.arange(first, call.k_len, device=end.device)
            rows = (qidx[None, :] >= end[:, None]) & (end[:, None] >= 0)  # [B, Tq]
            self._rows_total = self._rows_total + rows.sum() * call.num_heads
        else:
            if "var_labels" not in state or state["var_labels"].shape[1] < call.k_len:
                return
            rows = state["var_rows"].expand(-1, call.q_len)  # decode rows follow the image
            self._decode_rows.add(call.layout, call.q_len * call.num_heads, call.controller.forward_index)
        # Per-layer views of buffers prepared at the prefill: no work per decode step.
        plan.labels = state["var_labels"][:, : call.k_len]
        weights = state["var_weights"][:, :, : call.k_len]
        plan.set_reweight(Reweight(rows, float(c.p), float(c.rho), float(c.min_image_mass), weights))

    def _prepare(self, state: dict, call) -> None:
        """At a prefill, per layer: the sink-overlaid labels (TEXT -> TEXT_SINK, IMAGE ->
        IMAGE_SINK; PAD stays) and the reweighting weights ``[B, 1, capacity, 2]`` (image,
        image sink), over the layout's whole capacity. Generated positions are text."""
        layout = call.layout
        base = layout.buffers[0].clone()
        base[:, layout.length :] = Label.TEXT
        cap = base.shape[1]
        sink = torch.zeros_like(base, dtype=torch.bool)
        n = min(cap, state["var_sink"].shape[1])
        sink[:, :n] = state["var_sink"][:, :n]
        sink[:, layout.length :] = False
        labels = base + (sink & (base != Label.PAD)).to(base.dtype)
        image_sink = labels == Label.IMAGE_SINK
        image = (labels == Label.IMAGE) | image_sink
        state["var_labels"] = labels
        state["var_weights"] = torch.stack((image, image_sink), dim=-1).float()[:, None]
        state["var_rows"] = (layout.image_end >= 0)[:, None]
        self._sinks[call.layer_idx] = image_sink.sum()  # device: read in stats()

    def observe(self, call, plan, result) -> None:
        if plan.reweight is None or result.selected is None or call.layer_idx not in self.layers:
            return
        # device-side counter: no host sync per layer; stats() reads it once
        self._rows_selected = accumulate(self._rows_selected, result.selected.sum())

    _DECODE_KEYS = ("var_labels", "var_weights", "var_rows")  # what a decode step reads, per layer

    def graph_state(self):
        from vlmfix.fastpath import GraphState

        ctrl = self.handle.controller
        tensors = {"rows_selected": self._rows_selected}
        prepared = []
        for idx in sorted(self.layers):
            state = ctrl.state.get(idx, {})
            if all(k in state for k in self._DECODE_KEYS):
                prepared.append(idx)
                tensors.update({f"{idx}.{k}": state[k] for k in self._DECODE_KEYS})
        return GraphState(
            tensors=tensors,
            decisions=(tuple(prepared),),
            per_step={"row_heads": self._decode_rows.last_row_heads},
        )

    def bind_graph_state(self, kept) -> None:
        ctrl = self.handle.controller
        for name, t in kept.tensors.items():
            if "." in name:
                idx, key = name.split(".", 1)
                ctrl.layer_state(int(idx))[key] = t
        if isinstance(kept.tensors["rows_selected"], torch.Tensor):
            self._rows_selected = kept.tensors["rows_selected"]
        self._decode_rows.expect(ctrl.layout, kept.per_step["row_heads"])

    def replayed(self, n: int) -> None:
        self._decode_rows.repeat_last_forward(n)

    def stats(self) -> dict[str, Any]:
        total = int(self._rows_total) + self._decode_rows.total()
        selected = int(self._rows_selected)
        return {
            "layers": sorted(self.layers),
            "dims": {str(k): v for k, v in sorted(self._dims_seen.items())},
            "dims_source": "config" if self.config.dims else ("table" if self.fixed_dims else "discovered"),
            "sinks_per_layer": {str(k): int(v) for k, v in sorted(self._sinks.items())},
            "rows_considered": total,
            "rows_redistributed": selected,
            "rows_redistributed_fraction": selected / total if total else 0.0,
            **self._no_effect(selected),
        }

    def _no_effect(self, selected: int) -> dict[str, str]:
        """A ``no_effect`` note when no sink was found in any layer (results records flag it)."""
        sinks = [int(v) for v in self._sinks.values()]
        if selected or not sinks or any(sinks):
            return {}
        return {
            "no_effect": f"0 sink tokens in every edited layer (tau={self.config.tau}), so VAR changed nothing; "
            "pass a smaller tau for this model (see the attach warning)"
        }
