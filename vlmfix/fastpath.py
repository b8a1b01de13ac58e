"""The fast decode path of :func:`vlmfix.generate`: a static KV cache and one CUDA graph.

The eager loop (:func:`vlmfix.generation._decode_loop`) pays for every decode step in
Python and kernel launches: hundreds of small launches per step for a 7B model, more with
attention methods attached. The fast path removes that cost without changing a token:

1. **Static cache.** The prefill runs eagerly, as on the eager path, but writes its keys and
   values into :class:`StaticKV` layers sized to the request (prompt length ``L`` plus
   ``max_new_tokens``). A prefill call still sees exactly its ``L`` keys (a view), so every
   method's prefill is unchanged; every decode call sees the whole capacity ``C``, with the
   columns not generated yet invisible.
2. **Static token maps.** The controller switches its layouts (the batch layout and every
   per-layer layout of token pruning) to :meth:`~vlmfix.layout.Layout.as_static` maps of
   exactly ``C`` columns: generated columns are written in place at a device-side cursor
   (label ``TEXT``, the token's position), future columns are ``PAD`` with an unreachable
   position, so both the label and the position rule hide them. The query's position comes
   from the step's ``position_ids`` (:attr:`StaticDecode.q_pos`), not from its column.
3. **One step function.** Model forward, the methods' logits edits and contrastive combine,
   sampling, the EOS flags and the input of the next step are written into preallocated
   buffers by one function of device tensors only (``step`` reaches the methods as a 0-dim
   device tensor). On CUDA it runs once eagerly (the warm-up and first decode step), is
   captured once into a ``torch.cuda.CUDAGraph`` and replayed for every later step;
   elsewhere (or with ``decode_path="static"``) it runs eagerly each step, which is how the
   CPU tests check that the fast path gives the eager path's tokens.

Where capture is impossible the step keeps running uncaptured, and the reason is logged and
recorded in :attr:`vlmfix.GenerationOutput.decode`; where the static step itself does not
apply (no KV cache, beam search, or a method that declares a reason in
:attr:`vlmfix.methods.Method.fast_path_blocker`) :func:`vlmfix.generate` uses the eager loop.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DECODE_PATHS",
    "GraphState",
    "StaticDecode",
    "StaticKV",
    "blockers",
    "release",
    "resolve_decode_path",
    "static_cache",
]

logger = logging.getLogger(__name__)

DECODE_PATHS = ("auto", "eager", "static", "graph")


def resolve_decode_path(decode_path: str, device) -> str:
    """``"auto"`` -> ``"graph"`` on CUDA, ``"eager"`` elsewhere; ``"graph"`` needs CUDA."""
    from vlmfix.errors import ConfigError

    if decode_path not in DECODE_PATHS:
        raise ConfigError(f"decode_path={decode_path!r} is not one of {DECODE_PATHS}")
    cuda = torch.device(device).type == "cuda"
    if decode_path == "auto":
        return "graph" if cuda else "eager"
    if decode_path == "graph" and not cuda and not _EMULATE:
        raise ConfigError(
            f"decode_path='graph' captures CUDA graphs but the model is on {device}; "
            "use decode_path='static' (same step, uncaptured) or 'eager'"
        )
    return decode_path


def blockers(methods, *, use_cache: bool, num_beams: int) -> list[str]:
    """Why the static step cannot serve this request (empty when it can)."""
    out = []
    if not use_cache:
        out.append("use_cache=False recomputes the whole sequence at every step")
    if num_beams > 1:
        out.append("beam search reorders rows, the cache and method state between steps")
    for m in methods:
        reason = getattr(m, "fast_path_blocker", None)
        if reason:
            out.append(f"{m.name}: {reason}")
    return out


class StaticKV:
    """One decoder layer's KV cache of fixed capacity (a transformers cache layer).

    The prefill writes its ``L`` keys at columns ``0..L-1`` and returns views of exactly
    those columns (the same values as a ``DynamicCache``). A decode call writes its key at
    the device-side cursor :attr:`length` and returns the whole buffer; the caller's mask
    hides the columns not written yet. Nothing here reads a device value on the host.
    """

    is_compileable = True
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False
        self.length: torch.Tensor | None = None  # device cursor: columns written
        self.prefill_length = 0  # host: columns written by the prefill

    def __repr__(self) -> str:
        return f"StaticKV(capacity={self.capacity})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        dev = key_states.device
        self.keys = torch.zeros((B, H, self.capacity, D), dtype=key_states.dtype, device=dev)
        self.values = torch.zeros((B, H, self.capacity, value_states.shape[-1]), dtype=value_states.dtype, device=dev)
        self.length = torch.zeros((), dtype=torch.long, device=dev)
        self.device = dev
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.prefill_length == 0:
            if n > self.capacity:
                from vlmfix.errors import StateError

                raise StateError(f"the prefill holds {n} keys but the static cache was sized for {self.capacity}")
            self.keys[:, :, :n] = key_states
            self.values[:, :, :n] = value_states
            self.length.fill_(n)
            self.prefill_length = n
            return self.keys[:, :, :n], self.values[:, :, :n]
        index = self.length.view(1) + torch.arange(n, device=self.device)
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        self.length.add_(n)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # Host-side: the prefill length (decode steps are counted on the device only).
        return self.prefill_length

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return (query_length if self.prefill_length == 0 else self.capacity), 0

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.length.zero_()
        self.prefill_length = 0


def static_cache(model, capacity: int):
    """A transformers ``Cache`` of :class:`StaticKV` layers for the text model of ``model``."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    layer_cls = type("VlmfixStaticKV", (StaticKV, CacheLayerMixin), {})
    n = model.config.get_text_config().num_hidden_layers
    return Cache(layers=[layer_cls(capacity) for _ in range(n)])


@dataclass
class StaticDecode:
    """The controller's static-decode state (set by the fast path after the prefill).

    Attributes:
        capacity: key columns of every decode call (the static cache capacity ``C``).
        q_pos: long ``[R, 1]``, the position of this step's token per row (written by the
            step before the forward).
        step: 0-dim long, the decode step (0 for the first token after the prefill's).
        base: 0-dim long, the batch map's filled columns at the prefill (``L``), on the
            device: the graph of a reused step reads it, so each call sets its own.
    """

    capacity: int
    q_pos: torch.Tensor
    step: torch.Tensor
    base: torch.Tensor | None = None


class GraphRunner:
    """Runs a step function eagerly once, then captures it and replays it.

    ``mode="graph"`` captures on CUDA (elsewhere, under :func:`vlmfix.testing.emulated_graphs`,
    into an :class:`EmulatedGraph`); a capture that fails leaves the step running
    uncaptured (:attr:`fallback` says why). ``mode="static"`` never captures.
    """

    def __init__(self, fn, mode: str, device, generator: torch.Generator | None = None):
        self.fn = fn
        self.mode = mode
        self.device = torch.device(device)
        self.generator = generator
        self.graph = None
        self.calls = 0
        self.replays = 0
        self.capture_s = 0.0
        self.fallback: str | None = None

    def __call__(self) -> None:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            return
        if self.mode != "graph" or self.calls == 1 or self.fallback is not None:
            self.fn()
            return
        ran = self._capture()
        if self.graph is not None:
            if not ran:
                self.graph.replay()
            self.replays += 1
        elif not ran:
            self.fn()

    def _capture(self) -> bool:
        """Capture :attr:`fn`; True when capturing also ran it (the emulated capture)."""
        t0 = time.perf_counter()
        if self.device.type != "cuda":
            graph = EmulatedGraph()
            try:
                graph.capture(self.fn)
            except CaptureError as exc:
                self.fallback = f"graph capture failed ({exc}); decoding uncaptured"
                logger.warning("vlmfix fast path: %s", self.fallback)
                return True
            self.graph = graph
            self.capture_s = time.perf_counter() - t0
            return True
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)
        try:
            with torch.cuda.graph(graph):
                self.fn()
        except Exception as exc:  # capture is an optimisation: keep going uncaptured
            self.fallback = f"CUDA graph capture failed ({type(exc).__name__}: {exc}); decoding uncaptured"
            logger.warning("vlmfix fast path: %s", self.fallback)
            torch.cuda.synchronize(self.device)
            return False
        torch.cuda.synchronize(self.device)
        self.graph = graph
        self.capture_s = time.perf_counter() - t0
        return False


# ---------------------------------------------------------------------------- emulation
# CUDA graphs exist on CUDA only, yet what they demand of the code they capture (no host
# syncs, device state updated in place, every tensor read still alive and at the same
# address, Python run once) is what the CPU tests must check. EmulatedGraph gives a step
# the same semantics on any device: its capture runs the step once and records every aten
# op with the tensors it read and wrote; a replay runs those ops again, on those tensors,
# and nothing else. Tests turn it on with vlmfix.testing.emulated_graphs().

_EMULATE = False


class CaptureError(RuntimeError):
    """A step did something a CUDA graph cannot capture."""


def _refused(func, args) -> str | None:
    """Why ``func`` cannot be captured (a host sync or a data-dependent shape), or None."""
    name = func.name() if hasattr(func, "name") else str(func)
    base = name.split("::")[-1].split(".")[0]
    if base in _SYNC_OPS:
        return f"{name} needs the host (a sync or an output shape that depends on data)"
    if base in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else ()
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ()):
            return f"{name} with a boolean mask has an output shape that depends on data"
    return None


_SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "nonzero",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "equal",
        "is_nonzero",
        "bincount",
        "repeat_interleave",
        "allclose",
    }
)


class EmulatedGraph:
    """CUDA-graph semantics on any device, for tests (see the comment above).

    Like a CUDA graph, a replay repeats only device work: host values stay as they were
    at capture (Python branches, ints, attributes rebound later), tensors the step
    allocated are reused in place, and tensors it read from outside must still be alive
    (a replay that would read a freed one raises, where a real graph would read garbage).
    An op that needs the host is refused at capture (:class:`CaptureError`).
    """

    def __init__(self):
        self.ops: list = []

    def capture(self, fn) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        graph = self
        made: set[int] = set()

        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                why = _refused(func, args)
                if why is not None:
                    raise CaptureError(why)
                out = func(*args, **kwargs)
                # An output is refreshed at replay unless it really aliases an input: ops
                # such as ``to`` or ``reshape`` are annotated as aliasing but may copy.
                held = {t.untyped_storage().data_ptr() for t in _tensors(list(args) + list(kwargs.values()))}
                fresh = tuple(t.untyped_storage().data_ptr() not in held or t.numel() == 0 for t in _flat(out))
                if "lift_fresh" in str(func):  # a constant made from host data in the step
                    graph.ops.append((func, args, kwargs, out, fresh))
                else:
                    graph.ops.append((func, _hold(args, made), _hold(kwargs, made), out, fresh))
                for t in _tensors(out):
                    made.add(id(t))
                return out

        with Recorder():
            fn()

    def replay(self) -> None:
        for func, args, kwargs, out, fresh in self.ops:
            new = func(*_resolve(args), **_resolve(kwargs))
            for o, n, f in zip(_flat(out), _flat(new), fresh):
                if f:
                    o.copy_(n)


class _Ref:
    """A weak reference to a tensor the step read from outside (see EmulatedGraph)."""

    __slots__ = ("ref", "what")

    def __init__(self, t: torch.Tensor):
        self.ref = weakref.ref(t)
        self.what = f"{tuple(t.shape)} {t.dtype}"

    def get(self) -> torch.Tensor:
        t = self.ref()
        if t is None:
            raise CaptureError(f"a replay reads a tensor {self.what} that was freed after the capture")
        return t


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


def _flat(x) -> list[torch.Tensor]:
    return list(_tensors(x))


def _hold(x, made: set[int]):
    if isinstance(x, torch.Tensor):
        if id(x) in made or isinstance(x, torch.nn.Parameter):
            return x
        return _Ref(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_hold(v, made) for v in x)
    if isinstance(x, dict):
        return {k: _hold(v, made) for k, v in x.items()}
    return x


def _resolve(x):
    if isinstance(x, _Ref):
        return x.get()
    if isinstance(x, (tuple, list)):
        return type(x)(_resolve(v) for v in x)
    if isinstance(x, dict):
        return {k: _resolve(v) for k, v in x.items()}
    return x


# ---------------------------------------------------------------------------- reuse
# A captured decode step reads fixed addresses: the static cache, the static token maps,
# the step's input/output buffers and the attached methods' per-sequence tensors. A later
# call of the same shapes and methods can be served by the same graph: its prefill writes
# into the same cache and maps, each method's new per-sequence tensors are copied into the
# kept ones (Method.graph_state / bind_graph_state), and decoding starts with replays (no
# eager step, no capture). One such step is kept per model (module-level, weakly keyed:
# the model itself is not touched); a call of another shape or method set replaces it,
# after freeing it. release(model) frees it at once.

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
BUCKET = 128  # cache capacity bucket (columns) of reusable steps


def bucket(n: int) -> int:
    """The cache capacity of a reusable step: ``n`` rounded up to a multiple of 128."""
    return -(-n // BUCKET) * BUCKET


@dataclass
class GraphState:
    """What a captured decode step of one method depends on (see
    :meth:`vlmfix.methods.Method.graph_state`).

    Attributes:
        tensors: name -> every per-sequence tensor the method's decode hooks read or update
            in place (device counters included).
        decisions: host values that decided what those hooks did; a later call must have
            equal ones to be served by the same graph.
        per_step: host telemetry of one decode forward, for :meth:`~vlmfix.methods.Method.replayed`.
    """

    tensors: dict[str, Any] = field(default_factory=dict)
    decisions: tuple = ()
    per_step: dict[str, Any] = field(default_factory=dict)


def reusable(methods) -> bool:
    """Whether a captured step of these methods can serve a later call (see above)."""
    from vlmfix.methods.base import Method

    return all(
        type(m) is Method or getattr(m, "graph_reusable", False) or type(m).graph_state is not Method.graph_state
        for m in methods
    )


def states(methods) -> list[GraphState]:
    """Every method's :class:`GraphState` (an empty one for stateless methods)."""
    return [m.graph_state() or GraphState() for m in methods]


def _mismatch(new: GraphState, kept: GraphState) -> str | None:
    if new.decisions != kept.decisions:
        return f"host decisions differ ({new.decisions!r} vs {kept.decisions!r})"
    if new.tensors.keys() != kept.tensors.keys():
        return f"state tensors differ ({sorted(new.tensors)} vs {sorted(kept.tensors)})"
    for name, t in new.tensors.items():
        k = kept.tensors[name]
        if not isinstance(k, torch.Tensor):
            continue  # a counter the graph never updated: this call keeps its own
        if isinstance(t, torch.Tensor) and (t.shape != k.shape or t.dtype != k.dtype or t.device != k.device):
            return f"{name}: {tuple(t.shape)} {t.dtype} vs {tuple(k.shape)} {k.dtype}"
    return None


def adopt(buffers: StepBuffers, methods) -> str | None:
    """Let this call's methods be served by the kept step's graph: copy each method's
    per-sequence tensors into the kept ones and bind them (after the prefill). Returns
    None, or why the kept graph does not fit this call (then nothing was changed)."""
    new = states(methods)
    kept = buffers.states
    if kept is None or len(kept) != len(new):
        return "no method state was kept with the step"
    for m, n, k in zip(methods, new, kept):
        why = _mismatch(n, k)
        if why is not None:
            return f"{m.name}: {why}"
    with torch.no_grad():
        for n, k in zip(new, kept):
            for name, t in n.tensors.items():
                dst = k.tensors[name]
                if not isinstance(dst, torch.Tensor):
                    k.tensors[name] = t
                elif isinstance(t, torch.Tensor):
                    dst.copy_(t)
                else:
                    dst.fill_(t)
    for m, k in zip(methods, kept):
        m.bind_graph_state(k)
    return None


def _fingerprint(model) -> tuple:
    params = list(model.parameters())
    return (len(params), params[0].data_ptr(), params[-1].data_ptr(), params[0].dtype, str(params[0].device))


@dataclass
class StepBuffers:
    """Everything a captured decode step reads or writes, kept for reuse."""

    key: tuple
    fingerprint: tuple
    cache: object
    maps: tuple  # (labels, parts, positions) [R, C], image_start, image_end [R]
    ids_in: torch.Tensor
    pos_in: torch.Tensor
    step: torch.Tensor
    base: torch.Tensor
    mask_in: torch.Tensor
    generated: torch.Tensor
    done: torch.Tensor
    pad: torch.Tensor
    eos: torch.Tensor
    runner: GraphRunner | None = None
    states: list[GraphState] | None = None  # the methods' state the graph reads (after its capture)
    marked: tuple[str, ...] = ()  # methods that edited attention in the captured forward


def take(model, key: tuple) -> StepBuffers | None:
    """The kept step of ``model`` when it matches ``key`` (and the model's parameters are
    where they were); any other kept step is freed."""
    kept = _KEPT.get(model)
    if kept is None:
        return None
    if kept.key == key and kept.fingerprint == _fingerprint(model):
        for layer in kept.cache.layers:
            layer.prefill_length = 0
        return kept
    release(model)
    return None


def keep(model, buffers: StepBuffers) -> None:
    _KEPT[model] = buffers


def release(model) -> bool:
    """Free the decode step (graph, static cache, buffers) kept for ``model``; True if one was."""
    kept = _KEPT.pop(model, None)
    if kept is None:
        return False
    kept.runner = None
    kept.cache = None
    kept.states = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def new_buffers(model, key, R: int, C: int, B: int, dev, id_dtype, mask_dtype, eos=()) -> StepBuffers:
    """A fresh static cache of capacity ``C`` and the buffers of a static decode step
    (every tensor its graph reads or writes, besides the model's own weights, lives here).
    """
    from vlmfix.layout import Label

    maps = (
        torch.full((R, C), Label.PAD, dtype=torch.int8, device=dev),
        torch.zeros((R, C), dtype=torch.int8, device=dev),
        torch.zeros((R, C), dtype=torch.long, device=dev),
        torch.zeros(R, dtype=torch.long, device=dev),
        torch.zeros(R, dtype=torch.long, device=dev),
    )
    return StepBuffers(
        key=key,
        fingerprint=_fingerprint(model),
        cache=static_cache(model, C),
        maps=maps,
        ids_in=torch.zeros((R, 1), dtype=id_dtype, device=dev),
        pos_in=torch.zeros((R, 1), dtype=torch.long, device=dev),
        step=torch.ones((), dtype=torch.long, device=dev),
        base=torch.zeros((), dtype=torch.long, device=dev),
        mask_in=torch.ones((R, C), dtype=mask_dtype, device=dev),
        generated=torch.zeros((B, C), dtype=id_dtype, device=dev),
        done=torch.zeros(B, dtype=torch.bool, device=dev),
        pad=torch.zeros(B, dtype=id_dtype, device=dev),
        eos=torch.tensor(sorted(eos), dtype=torch.long, device=dev),
    )
