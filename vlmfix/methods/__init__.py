"""The method registry: every decoding-time method, by name.

Example:
    >>> import vlmfix
    >>> cfg = vlmfix.methods.get("baseline")()
    >>> cfg.to_dict()
    {'name': 'baseline'}
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["Method", "MethodConfig", "help_field", "register", "get", "available", "from_yaml", "parse", "build_config"]

_REGISTRY: dict[str, type[MethodConfig]] = {}


def register(config_cls: type[MethodConfig]) -> type[MethodConfig]:
    """Register a method config class under ``config_cls.name`` (usable as a decorator)."""
    name = config_cls.name
    if not name:
        raise ConfigError(f"{config_cls.__name__} has no `name`")
    if name in _REGISTRY and _REGISTRY[name] is not config_cls:
        raise ConfigError(f"a method named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = config_cls
    return config_cls


def available() -> list[str]:
    """Names of all registered methods."""
    return sorted(_REGISTRY)


def get(name: str) -> type[MethodConfig]:
    """The config class registered as ``name`` (case-insensitive).

    Raises:
        ConfigError: unknown name, with the closest known names suggested.
    """
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, available(), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown method {name!r}{hint} (known: {', '.join(available())})")


def _coerce(value: str) -> Any:
    import yaml

    return yaml.safe_load(value)


def build_config(name: str, overrides: dict[str, Any] | None = None) -> MethodConfig:
    """Instantiate method ``name`` with ``overrides`` applied to its defaults."""
    cls = get(name)
    return cls.from_dict(dict(overrides or {}))


def from_yaml(path: str | Path) -> list[MethodConfig]:
    """Load method configs from a YAML preset.

    The file holds one mapping with a ``name`` key, or a list of them, or
    ``{"methods": [...]}``; other keys are the method's options.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"method config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if isinstance(data, dict) and "methods" in data:
        data = data["methods"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, dict) and "name" in d for d in data):
        raise ConfigError(f"{path}: expected a mapping with a 'name' key, or a list of them")
    return [build_config(d["name"], {k: v for k, v in d.items() if k != "name"}) for d in data]


def parse(names: list[str] | None = None, configs: list[str] | None = None) -> list[MethodConfig]:
    """Build method configs from CLI-style specs.

    Args:
        names: method names, e.g. ``["var", "vcd"]``.
        configs: each a YAML file path or ``key=value`` / ``method.key=value`` overrides.
            A bare ``key=value`` applies to the single named method.

    Returns:
        One config per method, in the given order.
    """
    names = list(names or [])
    overrides: dict[str, dict[str, Any]] = {n.lower(): {} for n in names}
    from_files: list[MethodConfig] = []
    for spec in configs or []:
        if "=" not in spec:
            from_files.extend(from_yaml(spec))
            continue
        key, value = spec.split("=", 1)
        if "." in key:
            method, key = key.split(".", 1)
            method = method.lower()
        elif len(names) == 1:
            method = names[0].lower()
        else:
            raise ConfigError(f"--method-config {spec!r}: with {len(names)} methods, write METHOD.{key}={value}")
        if method not in overrides:
            raise ConfigError(f"--method-config {spec!r} names method {method!r}, which is not selected with --method")
        overrides[method][key.strip()] = _coerce(value)
    out = [build_config(n, overrides[n.lower()]) for n in names]
    return out + from_files


# Built-in methods register themselves on import.
from vlmfix.methods import avisc as _avisc  # noqa: E402,F401
from vlmfix.methods import baseline as _baseline  # noqa: E402,F401
from vlmfix.methods import fastv as _fastv  # noqa: E402,F401
from vlmfix.methods import icd as _icd  # noqa: E402,F401
from vlmfix.methods import m3id as _m3id  # noqa: E402,F401
from vlmfix.methods import pai as _pai  # noqa: E402,F401
from vlmfix.methods import pai_cfg as _pai_cfg  # noqa: E402,F401
from vlmfix.methods import paint as _paint  # noqa: E402,F401
from vlmfix.methods import pdrop as _pdrop  # noqa: E402,F401
from vlmfix.methods import random_prune as _random_prune  # noqa: E402,F401
from vlmfix.methods import token_exit as _token_exit  # noqa: E402,F401
from vlmfix.methods import token_merge as _token_merge  # noqa: E402,F401
from vlmfix.methods import var as _var  # noqa: E402,F401
from vlmfix.methods import vcd as _vcd  # noqa: E402,F401
from vlmfix.methods import vhr as _vhr  # noqa: E402,F401
from vlmfix.methods import visionzip as _visionzip  # noqa: E402,F401
