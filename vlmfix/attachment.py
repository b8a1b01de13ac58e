"""Scoped attachment of methods to a model.

:func:`attach` switches the text model to vlmfix's attention function, binds a
:class:`~vlmfix.attention.Controller` to its attention modules, keeps the batch layout up to
date with a forward pre-hook, and lets each method add its own scoped hooks. Everything
it changes is recorded and undone by :meth:`AttachHandle.remove` (or leaving the ``with``
block): attention implementation of every sub-config, hooks, registrations.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any

import torch

from vlmfix import _compat, attention
from vlmfix.adapters import get_adapter
from vlmfix.errors import ConfigError, StateError
from vlmfix.layout import Layout, build_layout, resolve_parts_from_embeddings
from vlmfix.methods.base import MethodConfig

__all__ = ["attach", "AttachHandle", "active_handle"]

logger = logging.getLogger(__name__)

_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _config_tree(config, prefix: str = ""):
    """Yield ``(dotted_key, config)`` for a config and all its sub-configs."""
    yield prefix, config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            yield from _config_tree(sub, f"{prefix}.{key}" if prefix else key)


def _attn_snapshot(model) -> dict[str, Any]:
    return {k: _compat.get_attn_impl(c) for k, c in _config_tree(model.config)}


def active_handle(model) -> AttachHandle | None:
    """The handle currently attached to ``model``, if any."""
    return _ACTIVE.get(model)


class AttachHandle:
    """A live attachment of methods to a model. Use :func:`attach` to create one.

    Attributes:
        model: the model.
        adapter: its :class:`~vlmfix.adapters.Adapter`.
        methods: the method runtimes, in application order.
        controller: the :class:`~vlmfix.attention.Controller` shared with the attention function.
    """

    def __init__(self, model, configs: list[MethodConfig], backend: str = "auto"):
        for cfg in configs:
            if not isinstance(cfg, MethodConfig):
                raise ConfigError(
                    f"attach() takes method configs such as vlmfix.VAR(); got {type(cfg).__name__}: {cfg!r}"
                )
        if model in _ACTIVE:
            raise StateError("methods are already attached to this model; remove() that handle first")
        self.model = model
        self.adapter = get_adapter(model)
        self.configs = sorted(configs, key=lambda c: c.order)
        self.methods = [cfg.build() for cfg in self.configs]
        self.controller = attention.Controller(model, self.adapter, self.methods, backend=backend)
        self._hooks: list[Any] = []
        self._attn_before = _attn_snapshot(model)
        self._modules = self.adapter.attention_modules(model)
        self._removed = False
        # Methods that act on logits or add branch rows only work inside vlmfix.generate.
        self._logit_methods = [
            m.name
            for m in self.methods
            if any(attention._overrides(m, h) for h in ("branches", "combine", "process_logits"))
        ]
        self._warned_logits = False
        self._setup()

    # ------------------------------------------------------------------ lifecycle
    def _setup(self) -> None:
        attention.register()
        try:
            self.model.set_attn_implementation({"text_config": attention.ATTN_NAME})
            attention.bind(self._modules, self.controller)
            self.add_hook(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            if self.adapter.image_newline is not None:
                lm = self.adapter.get(self.model, "language_model")
                self.add_hook(lm.register_forward_pre_hook(self._pre_lm_forward, with_kwargs=True))
            _ACTIVE[self.model] = self
            for m in self.methods:
                m.on_attach(self)
        except BaseException:
            self.remove()
            raise

    def add_hook(self, removable) -> None:
        """Track a hook handle (from ``register_*_hook``) so :meth:`remove` removes it."""
        self._hooks.append(removable)

    def remove(self) -> None:
        """Detach every method and restore the model exactly as it was. Idempotent."""
        if self._removed:
            return
        self._removed = True
        for m in reversed(self.methods):
            try:
                m.on_detach()
            except Exception:  # keep restoring the model even if a method misbehaves
                logger.exception("method %s failed to detach cleanly", m.name)
        for h in reversed(self._hooks):
            h.remove()
        self._hooks.clear()
        attention.unbind(self._modules)
        if attention._IN_FLIGHT.get("controller") is self.controller:
            attention.set_in_flight(None)
        self._restore_attn()
        attention.unregister()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def _restore_attn(self) -> None:
        current = dict(_config_tree(self.model.config))
        request: dict[str, Any] = {}
        for key, impl in self._attn_before.items():
            node = request
            parts = key.split(".") if key else []
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            if parts:
                node[parts[-1]] = impl
            else:
                node[""] = impl
        try:
            self.model.set_attn_implementation(request)
        except Exception:
            logger.exception("set_attn_implementation failed while restoring; restoring configs directly")
        # set_attn_implementation may normalise values (e.g. None -> "sdpa"); write back the
        # exact snapshot so the configs are bit-for-bit what they were.
        for key, cfg in current.items():
            _compat.set_attn_impl(cfg, self._attn_before[key])

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ forward
    def _pre_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        # The phase comes from the cache's own length, whatever keyword carried it.
        past = _compat.cache_length(_compat.cache_from_kwargs(kwargs))
        ctrl = self.controller
        if self._logit_methods and ctrl.rows is None and not self._warned_logits:
            self._warned_logits = True
            warnings.warn(
                f"{', '.join(self._logit_methods)} act on next-token logits (and contrast rows) only inside "
                "vlmfix.generate(); this plain forward / model.generate() call runs without them",
                UserWarning,
                stacklevel=2,
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = None
            ctrl.custom_mask = True  # a custom 4D mask: always honour it
        else:
            ctrl.custom_mask = False
        if past == 0 or ctrl.layout is None:
            if input_ids is None:
                logger.warning("vlmfix: forward called with inputs_embeds only; no image layout is available")
                ctrl.layout = None
            else:
                mask = attention_mask[:, -input_ids.shape[1] :] if attention_mask is not None else None
                ctrl.layout = build_layout(
                    self.model.config,
                    self.adapter,
                    input_ids,
                    mask,
                    kwargs.get("image_sizes"),
                    capacity=input_ids.shape[1] + ctrl.decode_capacity,
                )
            ctrl.begin_forward(is_prefill=True)
            ctrl.state.clear()
        else:
            n = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
            ctrl.begin_forward(is_prefill=False)
            if ctrl.static is not None:
                ctrl.write_static()  # the static decode path: fill this step's column in place
            else:
                # No host sync here: the new positions are assumed attended (see Layout.extend).
                ctrl.extend_layouts(n)
        for m in self.methods:
            m.on_forward(self, kwargs)
        attention.set_in_flight(ctrl)
        return None

    def _pre_lm_forward(self, module, args, kwargs):
        layout = self.controller.layout
        embeds = kwargs.get("inputs_embeds")
        if layout is not None and layout.unresolved and embeds is not None and embeds.shape[1] == layout.length:
            newline = self.adapter.get(self.model, "image_newline")
            self.controller.layout = resolve_parts_from_embeddings(layout, self.model.config, embeds, newline)
        return None

    # ------------------------------------------------------------------ helpers
    @property
    def layout(self) -> Layout | None:
        return self.controller.layout

    def stats(self) -> dict[str, Any]:
        """Telemetry of every method, keyed by method name. Attention methods also report
        ``edited_forwards``: how many prefill and decode forwards they edited."""
        out = {}
        for m in self.methods:
            out[m.name] = m.stats()
            if m.edits_attention:
                counts = self.controller.edited_forwards.get(m.name, {"prefill": 0, "decode": 0})
                out[m.name]["edited_forwards"] = dict(counts)
        return out


def attach(model: torch.nn.Module, *methods: MethodConfig, backend: str = "auto") -> AttachHandle:
    """Attach methods to a model for the duration of a ``with`` block (or until ``remove()``).

    While attached, plain ``model(...)`` and ``model.generate(...)`` calls see the methods.

    Args:
        model: a supported LLaVA-family model (see :func:`vlmfix.load`).
        *methods: method configs, e.g. ``vlmfix.methods.get("baseline")()``.
        backend: ``"auto"`` (default: ``$VLMFIX_BACKEND`` when set, else ``"triton"`` on
            CUDA where the kernels run, ``"reference"`` elsewhere), ``"reference"`` (pure
            torch, any device) or ``"triton"`` (fused kernels; an error where they cannot run).

    Returns:
        An :class:`AttachHandle`; ``remove()`` restores the model bit-for-bit.

    Example:
        >>> with vlmfix.attach(model, vlmfix.methods.get("baseline")()) as h:  # doctest: +SKIP
        ...     out = model.generate(**inputs)
    """
    if len(methods) == 1 and isinstance(methods[0], (list, tuple)):
        methods = tuple(methods[0])
    return AttachHandle(model, list(methods), backend=backend)
