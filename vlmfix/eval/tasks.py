"""Task presets in YAML (``vlmfix/configs/eval/*.yaml``, shipped inside the package) with
``include:`` for variants.

A preset is a flat mapping of CLI option names (``template``, ``parser``, ``split``,
``n_images``, ``max_new_tokens``, ...) to values. ``include: base.yaml`` (a path
relative to the including file, or a list of them) is loaded first and then overridden,
so the three POPE splits are one base file plus three tiny files.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError
from vlmfix.io import read_text

__all__ = ["load_task_config", "CONFIG_DIR"]

#: Presets shipped inside the package (found through importlib.resources, so a wheel
#: install has them too).
CONFIG_DIR = Path(str(resources.files("vlmfix") / "configs" / "eval"))


def load_task_config(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a task preset, resolving ``include:`` recursively.

    Args:
        path: a YAML file, or the name of a shipped preset (``pope_random``).

    Raises:
        ConfigError: missing file, invalid YAML, a non-mapping document or an include cycle.
    """
    import yaml

    from vlmfix.io import shipped_yaml

    p = shipped_yaml(path, CONFIG_DIR).resolve()
    if not p.is_file():
        known = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise ConfigError(f"task config {path} not found; give a YAML file or one of {known}")
    if p in _seen:
        raise ConfigError(f"include cycle: {' -> '.join(str(s) for s in (*_seen, p))}")
    try:
        data = yaml.safe_load(read_text(p)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a task config must be a mapping, got {type(data).__name__}")
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else list(includes)
    merged: dict[str, Any] = {}
    for inc in includes:
        merged.update(load_task_config(p.parent / inc, (*_seen, p)))
    merged.update(data)
    return merged
