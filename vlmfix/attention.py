"""vlmfix's attention function and its registration with transformers.

vlmfix registers one attention function and one mask function under the name
``"vlmfix"`` with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and
switches only the text model to it. The function receives q/k/v after RoPE and after the
KV-cache update; it looks up the :class:`Controller` of the attached model through the
attention module (never through ``generate()`` kwargs or class attributes) and lets the
attached methods edit scores, probabilities or head outputs.

Registration is reference-counted: the names are added by the first attach and removed by
the last detach, and a name that someone else registered is never touched.
"""

from __future__ import annotations

import logging
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vlmfix import _compat
from vlmfix.kernels import reference

if TYPE_CHECKING:
    from vlmfix.layout import Layout
    from vlmfix.plan import RowStats

__all__ = ["ATTN_NAME", "AttentionCall", "Controller", "vlmfix_attention", "vlmfix_mask"]

logger = logging.getLogger(__name__)

ATTN_NAME = "vlmfix"
BACKENDS = ("auto", "reference", "triton")
BACKEND_ENV = "VLMFIX_BACKEND"
DECODE_ROWS = 8  # calls with at most this many query rows are decode-sized

# attention module -> controller of the model it belongs to (weak: no leaks).
_CONTROLLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REGISTRATION = {"count": 0, "owned": False}
# The controller whose attached model forward is running (see set_in_flight).
_IN_FLIGHT: dict[str, Controller | None] = {"controller": None}


@dataclass
class AttentionCall:
    """Everything an attention edit may need about one attention call.

    Attributes:
        layer_idx: decoder layer index.
        layout: the batch layout, aligned with the keys (``layout.length == Tk``; a
            mismatch raises :class:`~vlmfix.errors.LayoutMismatchError`), or None when the
            forward had no ``input_ids`` to build one from.
        q_len, k_len: query and key lengths.
        num_heads, num_kv_heads: head counts.
        controller: the controller (per-layer state lives in ``controller.state``).
        is_prefill: True on the first forward of a sequence.
        scaling: the score scale of this call (``q . k * scaling``).
        row_stats: :class:`~vlmfix.plan.RowStats` of the last query row on the unedited
            scores, when a method asked for them (:meth:`Method.wants_row_stats`).

    Methods read shapes and the layout from here; they never get a score matrix, and they
    must not read ``query`` / ``key`` / ``value`` in the decode hot path.
    """

    layer_idx: int
    layout: Layout | None
    q_len: int
    k_len: int
    num_heads: int
    num_kv_heads: int
    controller: Controller
    is_prefill: bool
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    scaling: float | None = None
    row_stats: RowStats | None = None

    def row_output(self, weights: torch.Tensor) -> torch.Tensor:
        """The last query row's attention output with ``weights`` in place of its
        probabilities: ``sum_j w[b, h, j] v[b, h, j]``, fp32 ``[B, H, D]``.

        ``weights`` is fp32 ``[B, H, Tk]`` (typically ``row_stats.probs`` with some keys or
        heads edited, e.g. ONLY's text-enhanced branch). Like :class:`~vlmfix.plan.RowStats`
        it costs ``O(H * Tk * D)`` and is allowed in the decode hot path."""
        v = reference.expand_kv(self.value, self.num_heads // self.num_kv_heads).float()
        return (weights[:, :, None, :].to(v.dtype) @ v)[:, :, 0]

    @property
    def query_positions(self) -> torch.Tensor:
        """Key-axis positions of the query rows, ``[Tq]``."""
        return torch.arange(self.k_len - self.q_len, self.k_len)


class Controller:
    """Per-model state shared by the attention function and the attached methods.

    Attributes:
        model: the model (weakly referenced by the registry, strongly here).
        methods: attached method runtimes, in application order.
        backend: ``"reference"`` or ``"triton"``.
        layout: the current batch :class:`~vlmfix.layout.Layout` (None before a forward).
        state: per-layer scratch space, ``state[layer_idx][key]``.
        is_prefill: whether the forward in flight is a prefill.
        rows: inside :func:`vlmfix.generate`, the :class:`~vlmfix.branches.RowMap` of the
            batch (which rows are main rows, which are contrast branches); else None.
        edited_forwards: per method, how many prefill and decode forwards it edited.
    """

    def __init__(self, model, adapter, methods, backend: str = "auto"):
        from vlmfix.loading import input_device

        device = input_device(model)
        self.backend = resolve_backend(backend, device)
        self._execute, self._row_stats = reference.execute, reference.plan_row_stats
        self._decode_execute = self._static_execute = reference.execute
        if self.backend == "triton":
            from vlmfix.kernels import triton_backend

            self._execute, self._row_stats = triton_backend.execute, triton_backend.row_stats
            self._static_execute = triton_backend.execute_static
            # Decode steps run eagerly one launch at a time, where the kernels' launch cost
            # outweighs their speed (docs/benchmarks.md): "auto" keeps the reference path
            # for decode-sized calls; a forced backend="triton" runs the kernels everywhere.
            forced = backend == "triton" or os.environ.get(BACKEND_ENV, "").strip().lower() == "triton"
            self._decode_execute = triton_backend.execute if forced else reference.execute
        self.model = model
        self.adapter = adapter
        self.methods = list(methods)
        self.layout: Layout | None = None
        self.state: dict[int, dict[str, Any]] = {}
        self.is_prefill = False
        # A custom 4D attention mask passed by the caller (honoured instead of positions).
        self.custom_mask = False
        # Columns to preallocate in the layout for decoding (vlmfix.generate sets it to
        # max_new_tokens; stock generate grows the buffers geometrically).
        self.decode_capacity = 64
        self.rows = None
        # When set, only these methods act (a probe forward declares who is active in it).
        self.active: list | None = None
        self.num_layers = len(adapter.decoder_layers(model))
        # method name -> {"prefill": n, "decode": n}: forwards in which the method edited
        # at least one attention call (see _mark_edit).
        self.edited_forwards: dict[str, dict[str, int]] = {}
        self.forward_index = 0
        self._last_marked: dict[str, int] = {}
        self._mask_key: tuple | None = None
        self._mask: torch.Tensor | None = None
        # Token maps of layers that keep fewer keys (token pruning): ``(first_layer, layout)``
        # in ascending order; layer ``l`` uses the last entry with ``first_layer <= l``.
        self.layer_layouts: list[tuple[int, Layout]] = []
        # The static decode path's state (vlmfix.fastpath.StaticDecode), between the prefill
        # and the end of a fast-path generate; None on the eager path.
        self.static = None
        # With a device_map, layers sit on several devices: per forward, a copy of each
        # token map on each device other than the inputs' (see layout_on).
        self._copies: dict[tuple[int, torch.device], Layout] = {}

    def enter_static(self, static, into: tuple | None = None) -> None:
        """Switch to static decoding after a prefill: every token map gets exactly
        ``static.capacity`` columns (see :meth:`Layout.as_static`; ``into``: buffers for the
        batch map, of a reused captured step)."""
        self.static = static
        self.layout = self.layout.as_static(static.capacity, into)
        self.layer_layouts = [(f, lay.as_static(static.capacity)) for f, lay in self.layer_layouts]

    def account_replays(self, n: int) -> None:
        """Telemetry of a captured decode step that ran ``n`` more times than Python ran it
        (CUDA graph replays): the last forward's edit counts, and each method's
        :meth:`~vlmfix.methods.Method.replayed`."""
        self.account_reused(self.marked_last_forward(), n)

    def marked_last_forward(self) -> tuple[str, ...]:
        """The methods that edited attention in the last forward (host-side)."""
        return tuple(name for name, index in self._last_marked.items() if index == self.forward_index)

    def account_reused(self, marked, n: int) -> None:
        """Telemetry of ``n`` replays of a kept decode step that Python never ran in this
        call: ``marked`` (from the call that captured it) edited attention in each."""
        if n <= 0:
            return
        for name in marked:
            self.edited_forwards.setdefault(name, {"prefill": 0, "decode": 0})["decode"] += n
        for m in self.methods:
            m.replayed(n)

    def exit_static(self) -> None:
        self.static = None

    def write_static(self) -> None:
        """A static decode step: fill this step's column of every token map on the device."""
        st = self.static
        index = st.step - 1  # the token of step s is the (s-1)-th generated key
        self.layout = self.layout.write_static(index, st.q_pos, st.base)
        self.layer_layouts = [(f, lay.write_static(index, st.q_pos)) for f, lay in self.layer_layouts]

    def query_positions(self, q_len: int) -> torch.Tensor:
        """Token positions ``[B, q_len]`` of the forward's query rows: the last ``q_len``
        columns of the batch layout, or the step's positions on the static decode path."""
        if self.static is not None and not self.is_prefill:
            return self.static.q_pos
        return self.layout.positions[:, -q_len:]

    def layer_state(self, layer_idx: int) -> dict[str, Any]:
        return self.state.setdefault(layer_idx, {})

    def layout_for(self, layer_idx: int) -> Layout | None:
        """The token map of one layer: positions, labels and (with pruning) the keys this
        layer keeps. Without pruning every layer keeps every key: the batch layout."""
        layout = self.layout
        for first, pruned in self.layer_layouts:
            if layer_idx < first:
                break
            layout = pruned
        return layout

    def layout_on(self, layout: Layout, device: torch.device) -> Layout:
        """``layout`` on ``device``: itself, or (model split over devices with a
        ``device_map``) a copy made once per forward and device."""
        if layout.buffers[0].device == device:
            return layout
        key = (id(layout), device)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = layout.to(device)
        return copy

    def set_layer_layout(self, first_layer: int, layout: Layout) -> None:
        """From ``first_layer`` on (until a later entry), layers hold exactly the keys of
        ``layout`` (a token-pruning method sets this during the prefill). Cleared at every
        prefill; extended with the batch layout at every decode step."""
        kept = [(f, lay) for f, lay in self.layer_layouts if f != first_layer]
        self.layer_layouts = sorted([*kept, (first_layer, layout)], key=lambda e: e[0])

    def extend_layouts(self, n: int) -> None:
        """Append ``n`` generated positions to the batch layout and every per-layer layout
        (in place in preallocated buffers; no host sync)."""
        self.layout = self.layout.extend(n)
        self.layer_layouts = [(f, lay.extend(n)) for f, lay in self.layer_layouts]

    @contextmanager
    def only(self, methods):
        """Within the block only ``methods`` act (used by probe forwards)."""
        saved = self.active
        self.active = list(methods)
        try:
            yield
        finally:
            self.active = saved

    def _visible(self, layout: Layout, q_len: int, k_len: int, attention_mask) -> torch.Tensor | None:
        """The bool visible mask ``[B, 1, Tq, Tk]`` of this forward, built once per forward
        from positions (None when plain causal attention needs no mask)."""
        key = (self.forward_index, layout.length, q_len, k_len, self.custom_mask)
        if self._mask_key is not None and self._mask_key[0] is layout and self._mask_key[1:] == key:
            return self._mask
        if self.custom_mask:
            mask = reference.as_bool_mask(attention_mask, q_len, k_len, layout.labels.device)
        elif self.static is not None and not self.is_prefill:
            mask = reference.visible_mask(layout.labels, self.static.q_pos, layout.positions)
        elif not layout.padded and q_len in (1, k_len):
            mask = None
        else:
            positions = layout.positions
            mask = reference.visible_mask(layout.labels, positions[:, k_len - q_len :], positions)
        if mask is not None:
            # A row that may attend nothing (a left-pad query) would give NaN, which would
            # leak into real rows through P @ V: let it see every key (its output is unused).
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        self._mask_key, self._mask = (layout, *key), mask
        return mask

    def attend(self, module, query, key, value, attention_mask, scaling):
        from vlmfix.plan import AttentionPlan

        layer_idx = module.layer_idx
        q_len, k_len = query.shape[2], key.shape[2]
        layout = self.layout_for(layer_idx)
        if layout is not None:
            layout = self.layout_on(layout, query.device)
        methods = self.methods if self.active is None else self.active
        if layout is None:
            mask = reference.as_bool_mask(attention_mask, q_len, k_len, query.device)
            out = reference.attention(query, key, value, mask, scaling)
            return out.transpose(1, 2).contiguous(), None
        if layout.length != k_len:
            from vlmfix.errors import LayoutMismatchError

            raise LayoutMismatchError(
                f"layer {layer_idx}: vlmfix tracks {layout.length} key positions but the attention call has "
                f"{k_len} keys (q_len={q_len}); refusing to run it without the attached methods. This is a "
                "vlmfix bug or an unsupported cache (a fixed-capacity cache works only through "
                "vlmfix.generate's fast path, decode_path='auto'/'graph'/'static')."
            )
        mask = self._visible(layout, q_len, k_len, attention_mask)
        positions = layout.positions
        static = self.static is not None and not self.is_prefill
        plan = AttentionPlan(
            layer=layer_idx,
            labels=layout.labels,
            q_pos=self.static.q_pos if static else positions[:, k_len - q_len :],
            k_pos=positions,
            plain_causal=mask is None,
            mask=mask,
            custom_mask=self.custom_mask,
        )
        call = AttentionCall(
            layer_idx=layer_idx,
            layout=layout,
            q_len=q_len,
            k_len=k_len,
            num_heads=query.shape[1],
            num_kv_heads=key.shape[1],
            controller=self,
            is_prefill=self.is_prefill,
            query=query,
            key=key,
            value=value,
            scaling=scaling,
        )
        if any(m.wants_row_stats(call) for m in methods):
            plan.want_row_stats = True
            call.row_stats = self._row_stats(query, key, value, plan, scaling)
        for m in methods:
            before = (plan.score_coef, plan.reweight, plan.head_scale)
            m.contribute(call, plan)
            if any(a is not b for a, b in zip(before, (plan.score_coef, plan.reweight, plan.head_scale))):
                self._mark_edit(m)
        # A static decode step is replayed as a CUDA graph, where kernel launches cost
        # nothing on the host: it takes the backend's kernels, plain plans included.
        if static:
            execute = self._static_execute
        else:
            execute = self._decode_execute if q_len <= DECODE_ROWS else self._execute
        out, result = execute(query, key, value, plan, scaling)
        result.row_stats = call.row_stats
        for m in methods:
            m.observe(call, plan, result)
        return out.transpose(1, 2).contiguous(), None

    # ------------------------------------------------------------------ bookkeeping
    def begin_forward(self, is_prefill: bool) -> None:
        """Called by the attachment before every model forward (host-side only)."""
        self.is_prefill = is_prefill
        self.forward_index += 1
        self._copies.clear()
        if is_prefill:
            self.layer_layouts = []
            self.static = None

    def _mark_edit(self, method) -> None:
        # Counts forwards (not layers) in which a method edited at least one attention call,
        # per phase; host-side integers only, so no device sync.
        if self._last_marked.get(method.name) == self.forward_index:
            return
        self._last_marked[method.name] = self.forward_index
        phase = "prefill" if self.is_prefill else "decode"
        counts = self.edited_forwards.setdefault(method.name, {"prefill": 0, "decode": 0})
        counts[phase] += 1


def resolve_backend(backend: str, device) -> str:
    """The attention backend to use on ``device``: ``"reference"`` or ``"triton"``.

    ``backend="auto"`` (the default) takes ``$VLMFIX_BACKEND`` when set, else ``"triton"`` on
    a CUDA device where the kernels can run and ``"reference"`` elsewhere. A forced
    ``"triton"`` that cannot run raises :class:`~vlmfix.errors.BackendUnavailableError`.
    """
    from vlmfix.errors import ConfigError

    chosen = backend
    if backend == "auto":
        chosen = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
        source = f"${BACKEND_ENV}={chosen!r}"
    else:
        source = f"backend={backend!r}"
    if chosen not in BACKENDS:
        raise ConfigError(f"{source} is not one of {BACKENDS}")
    from vlmfix.kernels import dispatch

    device = torch.device(device)
    if chosen == "auto":
        return "triton" if device.type == "cuda" and dispatch.available(device) else "reference"
    if chosen == "triton":
        dispatch.require(device)
    return chosen


def _overrides(obj, name: str) -> bool:
    from vlmfix.methods.base import Method

    return getattr(type(obj), name, None) is not getattr(Method, name)


def controller_for(module) -> Controller | None:
    return _CONTROLLERS.get(module)


def bind(modules, controller: Controller) -> None:
    for m in modules:
        _CONTROLLERS[m] = controller


def unbind(modules) -> None:
    for m in modules:
        _CONTROLLERS.pop(m, None)


def vlmfix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The attention function registered as ``"vlmfix"``.

    Args:
        module: the attention module (carries ``layer_idx``).
        query: ``[B, H, Tq, D]`` after RoPE.
        key, value: ``[B, Hkv, Tk, D]`` after RoPE and the cache update.
        attention_mask: bool ``[B, 1, Tq, Tk]`` from :func:`vlmfix_mask` (or None).
        scaling: score scale; defaults to ``D ** -0.5``.

    Returns:
        ``(out[B, Tq, H, D], None)``.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    controller = _CONTROLLERS.get(module)
    if controller is None:
        # The model was switched to "vlmfix" without an attach: behave like plain attention.
        mask = reference.as_bool_mask(attention_mask, query.shape[2], key.shape[2], query.device)
        out = reference.attention(query, key, value, mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    return controller.attend(module, query, key, value, attention_mask, scaling)


def set_in_flight(controller: Controller | None) -> None:
    """Record the controller whose model forward is running (set by attach's pre-hook)."""
    _IN_FLIGHT["controller"] = controller


def vlmfix_mask(*args, **kwargs):
    """The mask function registered as ``"vlmfix"``.

    While an attached forward has a layout, the attention function builds masks from token
    positions itself, so no mask is materialised here (``None``). Otherwise this is
    transformers' boolean sdpa mask, always materialised (never skipped in favour of
    ``is_causal``), so the attention function knows exactly which keys each query sees."""
    ctrl = _IN_FLIGHT.get("controller")
    if ctrl is not None and ctrl.layout is not None and not ctrl.custom_mask:
        return None
    return _compat.sdpa_bool_mask(*args, **kwargs)


def register() -> None:
    """Register ``"vlmfix"`` with transformers (reference-counted)."""
    if _REGISTRATION["count"] == 0:
        current, _ = _compat.registered_attention(ATTN_NAME)
        if current is not None and current is not vlmfix_attention:
            from vlmfix.errors import StateError

            raise StateError(
                f"another attention function is already registered as {ATTN_NAME!r}; "
                "unregister it before attaching vlmfix methods"
            )
        # A leftover registration of our own function is ours to remove too.
        _REGISTRATION["owned"] = True
        _compat.register_attention(ATTN_NAME, vlmfix_attention, vlmfix_mask)
    _REGISTRATION["count"] += 1


def unregister() -> None:
    """Undo one :func:`register`; the last one removes what vlmfix added."""
    _REGISTRATION["count"] = max(0, _REGISTRATION["count"] - 1)
    if _REGISTRATION["count"] == 0 and _REGISTRATION["owned"]:
        _compat.unregister_attention(ATTN_NAME)
        _REGISTRATION["owned"] = False


def is_registered() -> bool:
    return any(f is not None for f in _compat.registered_attention(ATTN_NAME))
