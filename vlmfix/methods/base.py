"""Method configs and runtimes.

A method is two things:

* a frozen dataclass :class:`MethodConfig` — the one source of its defaults, with help
  text in each field's metadata, validation in ``__post_init__``, ``to_dict`` /
  ``from_dict`` — registered by name;
* a :class:`Method` runtime built from it by :meth:`MethodConfig.build` when attached to
  a model. The runtime overrides only the hooks it needs; the attention function calls
  a hook only when a runtime overrides it, so unused hooks cost nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from vlmfix.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from vlmfix.attachment import AttachHandle
    from vlmfix.attention import AttentionCall
    from vlmfix.branches import BranchSpec
    from vlmfix.fastpath import GraphState
    from vlmfix.plan import AttentionPlan, PlanResult

__all__ = ["MethodConfig", "Method", "help_field"]


def help_field(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with help text (shown by ``vlmfix methods`` and the CLI)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class MethodConfig:
    """Base class of every method config.

    Class attributes:
        name: registry name (``vlmfix.methods.get(name)``).
        order: composition order; lower runs first (token edits < attention edits <
            logit edits). Methods attached together are sorted by it.
        paper: citation / link shown in docs.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    paper: ClassVar[str] = ""

    def build(self) -> Method:
        """Create the runtime that implements this config."""
        raise NotImplementedError(f"{type(self).__name__} does not define build()")

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., field: value, ...}`` (JSON-serialisable)."""
        out = {"name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build from a dict (``name`` may be present); unknown keys raise ConfigError."""
        data = dict(data)
        name = data.pop("name", cls.name)
        if name != cls.name:
            raise ConfigError(f"config for method {name!r} given to {cls.__name__} ({cls.name!r})")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for method {cls.name!r}; valid options: {sorted(known)}")
        hints = _field_types(cls)
        for key, value in list(data.items()):
            data[key] = _check_type(cls.name, key, value, hints.get(key), known[key].default)
        return cls(**data)

    @classmethod
    def options(cls) -> list[dict[str, Any]]:
        """Field name, type, default and help of every option."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append({"name": f.name, "type": str(f.type), "default": default, "help": f.metadata.get("help", "")})
        return rows

    def _check(self, ok: bool, field_name: str, requirement: str) -> None:
        """Raise ConfigError naming the field, its value and what it must satisfy."""
        if not ok:
            raise ConfigError(
                f"{self.name}: {field_name}={getattr(self, field_name)!r} is invalid; it must be {requirement}"
            )


def _field_types(cls) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation: leave the checks to __post_init__
        return {}


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_type(method: str, key: str, value: Any, hint: Any, default: Any) -> Any:
    """Return ``value`` as field type ``hint`` wants it (int -> float, list -> tuple), or
    raise :class:`ConfigError` naming the option, the value and what it takes.

    YAML and ``KEY=VALUE`` overrides arrive typed by YAML, so ``alpha=abc`` (a string),
    ``alpha=true`` (a bool) and ``disturbance=123`` (a number) are caught here instead
    of being recorded or failing deep inside a forward.
    """
    import types
    import typing

    if hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_type(method, key, value, option, default)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{method}: {key}={value!r} is invalid")
    ok: Any = _MISSING
    if origin is tuple:
        args = typing.get_args(hint)
        item = args[0] if args else None
        if isinstance(value, (list, tuple)):
            ok = tuple(_check_type(method, f"{key}[{i}]", v, item, None) for i, v in enumerate(value))
    elif hint is bool:
        ok = value if isinstance(value, bool) else _MISSING
    elif hint is int:
        ok = value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    elif hint is float:
        ok = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISSING
    elif hint is str:
        ok = value if isinstance(value, str) else _MISSING
    else:
        return value
    if ok is _MISSING:
        if origin is tuple:
            wanted = f"a list of {_type_name(typing.get_args(hint)[0])}s"
        else:
            wanted = ("an " if _type_name(hint)[0] in "aeiou" else "a ") + _type_name(hint)
        quote = " (quote text that looks like a number or a bool, e.g. KEY='123')" if hint is str else ""
        example = f"; e.g. {key}={list(default) if isinstance(default, tuple) else default!r}" if default not in (
            None,
            dataclasses.MISSING,
        ) else ""
        raise ConfigError(
            f"{method}: {key}={value!r} ({type(value).__name__}) is invalid; {key} takes {wanted}{quote}{example}"
        )
    return ok


_MISSING = object()


class Method:
    """Runtime of a method attached to one model. Override only what you need.

    Hooks, in the order they run during a forward:

    * :meth:`on_forward` — before every model forward (layout already updated);
    * per attention call (one decoder layer): :meth:`wants_row_stats`, then
      :meth:`contribute` — add edits to the call's :class:`~vlmfix.plan.AttentionPlan`
      (pre-softmax score edits, post-softmax reweighting, head scales) — then, once the
      backend has executed the plan, :meth:`observe`;
    * :meth:`process_logits` — edit next-token logits inside :func:`vlmfix.generate`.

    Attention methods never see a score matrix: they describe edits as tensors and read
    statistics (:class:`~vlmfix.plan.RowStats`, :class:`~vlmfix.plan.PlanResult`). In decode
    steps a hook must be pure tensor work: no ``.item()``, ``bool(tensor)``, ``.tolist()``,
    ``.cpu()`` and no growing buffers (see ``docs/plans.md``).

    Contrastive methods also declare extra rows for :func:`vlmfix.generate` with
    :meth:`branches` and merge their logits in :meth:`combine` (see :mod:`vlmfix.branches`).

    The fast decode path (:mod:`vlmfix.fastpath`) runs a decode step's hooks once in Python
    and then replays what they did on the device (a CUDA graph). So in decode steps a hook
    must also keep no Python state that changes from step to step: ``step`` reaches
    :meth:`process_logits` / :meth:`combine` as a Python int at the prefill and as a 0-dim
    device tensor afterwards (use it in tensor arithmetic only); device state is updated in
    place (``t.add_(x)``, not ``t = t + x``); host-side counters are brought up to date by
    :meth:`replayed`. In a static decode call ``call.k_len`` is the cache capacity and the
    query's position is ``plan.q_pos`` (not its column). A method that cannot meet this
    sets :attr:`fast_path_blocker` to the reason, and :func:`vlmfix.generate` decodes
    eagerly when it is attached.
    """

    #: Why this method cannot run on the static decode path (None: it can).
    fast_path_blocker: str | None = None
    #: True when the method holds no per-sequence tensors and no telemetry in decode steps
    #: (e.g. a contrastive combine of the logits alone): then a captured decode step of one
    #: call serves later calls of the same shapes (see :mod:`vlmfix.fastpath`). Methods
    #: with per-sequence tensors opt in by implementing :meth:`graph_state`.
    graph_reusable: bool = False

    def __init__(self, config: MethodConfig):
        self.config = config
        self.handle: AttachHandle | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def edits_attention(self) -> bool:
        """Whether this runtime contributes to attention plans."""
        return type(self).contribute is not Method.contribute

    def on_attach(self, handle: AttachHandle) -> None:
        """Called once when attached; register scoped hooks with ``handle.add_hook``."""
        self.handle = handle

    def on_detach(self) -> None:
        """Called once when the handle is removed (hooks are removed by the handle)."""
        self.handle = None

    def on_forward(self, handle: AttachHandle, kwargs: dict[str, Any]) -> None:
        """Called before every forward of the model."""

    def wants_row_stats(self, call: AttentionCall) -> bool:
        """Whether this call must measure :class:`~vlmfix.plan.RowStats` (last query row,
        unedited scores); they arrive in ``call.row_stats`` before :meth:`contribute`."""
        return False

    def contribute(self, call: AttentionCall, plan: AttentionPlan) -> None:
        """Add this method's edits for one attention call to ``plan``."""

    def observe(self, call: AttentionCall, plan: AttentionPlan, result: PlanResult) -> None:
        """Read what the executed plan reports (e.g. which rows a reweighting selected)."""

    def process_logits(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        """Edit next-token logits ``[B, V]`` (fp32) at generation step ``step``."""
        return logits

    def reorder_rows(self, index: torch.Tensor) -> None:
        """Beam search moved the rows of the running batch: row ``r`` now continues old row
        ``index[r]`` (long ``[num_rows]``, an index with repeats within each sample's
        rows). Gather any per-row state that differs between the beams of a sample (e.g.
        flags of generated positions); state fixed at the prefill is the same for every beam
        of a sample and needs nothing. Called between decode steps; pure tensor code."""

    def beam_penalty(self, step: int) -> torch.Tensor | None:
        """Beam search only: fp32 ``[num_main_rows]``, a penalty per running beam, subtracted
        from the accumulated score of every continuation of that beam at step ``step``
        (OPERA / HELPD-style over-trust penalties). None: no penalty. Greedy and sampled
        decoding do not call it (a per-row constant changes no row's choice)."""
        return None

    def branches(self) -> tuple[BranchSpec, ...]:
        """Contrast branches this method needs inside :func:`vlmfix.generate` (one extra
        row per sample each). Called once per ``generate`` call, before tokenisation."""
        return ()

    def combine(self, step: int, logits: torch.Tensor, branch_logits: list[torch.Tensor]) -> torch.Tensor:
        """Merge main-row logits ``[B, V]`` (fp32) with this method's branch logits (one
        ``[B, V]`` per entry of :meth:`branches`, same order) at generation step ``step``.
        Runs before this method's :meth:`process_logits`."""
        return logits

    def replayed(self, n: int) -> None:
        """The last decode forward ran ``n`` more times on the device than its hooks ran in
        Python (CUDA graph replays): add its host-side telemetry ``n`` more times."""

    def graph_state(self) -> GraphState | None:
        """What this method's decode hooks depend on, so that a captured decode step can
        serve a later call (:mod:`vlmfix.fastpath`, "reuse"). Called after the prefill (and
        at the end of the call that captured the step). Return a
        :class:`~vlmfix.fastpath.GraphState`: every per-sequence tensor the decode hooks read
        or update in place, the host values that decided what they did, and the host
        telemetry of one decode forward. ``None`` (the default) opts out of reuse unless
        :attr:`graph_reusable` is set. A later call is served only when its state has the
        same tensor names, shapes and dtypes and equal decisions; its tensors are then
        copied into the kept ones and handed to :meth:`bind_graph_state`."""
        return None

    def bind_graph_state(self, kept: GraphState) -> None:
        """Take the kept step's tensors (``kept.tensors``, already holding this call's
        values) as this method's own, so that what the replays update is what
        :meth:`stats` reads, and set up :meth:`replayed` from ``kept.per_step`` (this call
        runs no decode hook in Python: every decode step is a replay)."""

    def stats(self) -> dict[str, Any]:
        """Telemetry gathered since attach (JSON-serialisable)."""
        return {}
