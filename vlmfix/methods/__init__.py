"""The method registry: every decoding-time method, by name.

Example:
    >>> import vlmfix
    >>> cfg = vlmfix.methods.get("baseline")()
    >>> cfg.to_dict()
    {'name': 'baseline'}
"""

from __future__ import annotations

import difflib
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError
from vlmfix.io import read_text
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = [
    "Method",
    "MethodConfig",
    "help_field",
    "register",
    "get",
    "available",
    "from_yaml",
    "parse",
    "build_config",
    "PRESET_DIR",
    "presets",
]

_REGISTRY: dict[str, type[MethodConfig]] = {}

#: Paper-default presets shipped inside the package (``vlmfix/configs/methods``).
PRESET_DIR = Path(str(resources.files("vlmfix") / "configs" / "methods"))

logger = logging.getLogger(__name__)


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


def presets() -> list[str]:
    """Names of the shipped method presets (``vlmfix.methods.from_yaml("vcd")``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []


def from_yaml(path: str | Path) -> list[MethodConfig]:
    """Load method configs from a YAML preset file, or a shipped preset by name.

    The file holds one mapping with a ``name`` key, or a list of them, or
    ``{"methods": [...]}``; other keys are the method's options.
    """
    import yaml

    from vlmfix.io import shipped_yaml

    path = shipped_yaml(path, PRESET_DIR)
    if not path.exists():
        raise ConfigError(
            f"method config file {str(path)!r} does not exist; give a YAML file or a shipped preset "
            f"({', '.join(presets())})"
        )
    try:
        data = yaml.safe_load(read_text(path))
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

    A method named with ``--method`` that a preset file also holds is applied once:
    the preset's values, then the ``KEY=VALUE`` overrides, with a warning. A method
    given twice otherwise (twice by name, or by two presets) is refused: applying a
    method twice is never what a user means.

    Returns:
        One config per method, in the given order (named methods, then presets).

    Raises:
        ConfigError: unknown method or option, a wrongly typed value, or a method given twice.
    """
    names = list(names or [])
    lowered = [n.strip().lower() for n in names]
    twice = sorted({n for n in lowered if lowered.count(n) > 1})
    if twice:
        raise ConfigError(f"--method {twice[0]} is given more than once; a method is applied once, name it once")
    overrides: dict[str, dict[str, Any]] = {n: {} for n in lowered}
    from_files: list[tuple[str, MethodConfig]] = []
    for spec in configs or []:
        if "=" not in spec:
            for cfg in from_yaml(spec):
                earlier = next((src for src, c in from_files if c.name == cfg.name), None)
                if earlier is not None:
                    raise ConfigError(
                        f"method {cfg.name!r} is in two presets ({earlier} and {spec}); keep one of them"
                    )
                from_files.append((spec, cfg))
            continue
        key, value = spec.split("=", 1)
        if "." in key:
            method, key = key.split(".", 1)
            method = method.strip().lower()
        elif len(names) == 1:
            method = lowered[0]
        else:
            raise ConfigError(f"--method-config {spec!r}: with {len(names)} methods, write METHOD.{key}={value}")
        if method not in overrides:
            raise ConfigError(f"--method-config {spec!r} names method {method!r}, which is not selected with --method")
        overrides[method][key.strip()] = _coerce(value)
    out = []
    for n in lowered:
        preset = next(((src, c) for src, c in from_files if c.name == get(n).name), None)
        if preset is None:
            out.append(build_config(n, overrides[n]))
            continue
        src, cfg = preset
        from_files.remove(preset)
        logger.warning(
            "method %r is given by --method and by the preset %s: applying it once, with the preset's "
            "values and the --method-config overrides %s",
            cfg.name,
            src,
            overrides[n] or "(none)",
        )
        out.append(build_config(n, {**{k: v for k, v in cfg.to_dict().items() if k != "name"}, **overrides[n]}))
    return out + [c for _, c in from_files]


# Built-in methods register themselves on import.
from vlmfix.methods import agla as _agla  # noqa: E402,F401
from vlmfix.methods import avisc as _avisc  # noqa: E402,F401
from vlmfix.methods import baseline as _baseline  # noqa: E402,F401
from vlmfix.methods import deco as _deco  # noqa: E402,F401
from vlmfix.methods import fastv as _fastv  # noqa: E402,F401
from vlmfix.methods import helpd as _helpd  # noqa: E402,F401
from vlmfix.methods import icd as _icd  # noqa: E402,F401
from vlmfix.methods import lol as _lol  # noqa: E402,F401
from vlmfix.methods import m3id as _m3id  # noqa: E402,F401
from vlmfix.methods import only as _only  # noqa: E402,F401
from vlmfix.methods import pai as _pai  # noqa: E402,F401
from vlmfix.methods import pai_cfg as _pai_cfg  # noqa: E402,F401
from vlmfix.methods import paint as _paint  # noqa: E402,F401
from vlmfix.methods import pdrop as _pdrop  # noqa: E402,F401
from vlmfix.methods import random_prune as _random_prune  # noqa: E402,F401
from vlmfix.methods import rbd as _rbd  # noqa: E402,F401
from vlmfix.methods import token_exit as _token_exit  # noqa: E402,F401
from vlmfix.methods import token_merge as _token_merge  # noqa: E402,F401
from vlmfix.methods import var as _var  # noqa: E402,F401
from vlmfix.methods import vcd as _vcd  # noqa: E402,F401
from vlmfix.methods import vhr as _vhr  # noqa: E402,F401
from vlmfix.methods import visionzip as _visionzip  # noqa: E402,F401
from vlmfix.methods import vista as _vista  # noqa: E402,F401
