"""Bench suites: the YAML that says what ``vlmfix bench`` times, validated in full before
any model is built.

A suite names the models, dtype, batch sizes, prompt and image settings, new tokens,
rounds and the variants (see :func:`parse_suite` for every key). Shipped suites live in
``vlmfix/configs/bench`` (package data) and are chosen by name (``--suite tiny``).

Example:
    >>> [v.name for v in load_suite("decode").variants]
    ['stock', 'stock_static', 'plain', 'var', 'pai', 'paint', 'vhr', 'vcd']
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vlmfix.bench.models import MODELS
from vlmfix.errors import ConfigError

__all__ = [
    "SUITE_DIR",
    "DEFAULT_SUITE",
    "STOCK_KINDS",
    "DECODE_PATHS",
    "Variant",
    "Suite",
    "shipped_suites",
    "load_suite",
    "parse_suite",
]

#: Suites shipped inside the package (``vlmfix/configs/bench``).
SUITE_DIR = Path(str(resources.files("vlmfix") / "configs" / "bench"))
DEFAULT_SUITE = "decode"

STOCK_KINDS = ("stock", "stock_static")
DECODE_PATHS = ("auto", "eager", "static", "graph")
BACKENDS = ("auto", "reference", "triton")
DTYPES = ("float16", "bfloat16", "float32")

_DEFAULTS: dict[str, Any] = {
    "description": "",
    "models": None,
    "dtype": "float16",
    "device": "auto",
    "batch_sizes": [1, 8, 32],
    "new_tokens": 64,
    "repeats": 3,
    "image_size": None,
    "prompt_words": [6, 23],
    "seed": 0,
    "backend": "auto",
    "decode_path": "auto",
    "variants": None,
}
_VARIANT_KEYS = ("name", "kind", "methods", "decode_path")


@dataclass(frozen=True)
class Variant:
    """One thing timed: a stock ``generate`` or :func:`vlmfix.generate` with methods.

    Attributes:
        name: label in the tables (unique in a suite).
        kind: ``"stock"``, ``"stock_static"`` or ``"vlmfix"``.
        methods: method configs (vlmfix variants; empty for plain vlmfix and stock).
        decode_path: vlmfix decode path asked for (``None`` for stock variants).
    """

    name: str
    kind: str
    methods: tuple = ()
    decode_path: str | None = None

    @property
    def is_plain(self) -> bool:
        return self.kind == "vlmfix" and not self.methods

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "methods": [m.to_dict() for m in self.methods],
            "decode_path": self.decode_path,
        }


@dataclass(frozen=True)
class Suite:
    """A validated bench suite (see :func:`parse_suite` for the YAML keys)."""

    name: str
    models: tuple[str, ...]
    variants: tuple[Variant, ...]
    dtype: str = "float16"
    device: str = "auto"
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    new_tokens: int = 64
    repeats: int = 3
    image_size: int | None = None
    prompt_words: tuple[int, int] = (6, 23)
    seed: int = 0
    backend: str = "auto"
    decode_path: str = "auto"
    description: str = ""
    source: str = ""
    text: str = field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "models": list(self.models),
            "dtype": self.dtype,
            "device": self.device,
            "batch_sizes": list(self.batch_sizes),
            "new_tokens": self.new_tokens,
            "repeats": self.repeats,
            "image_size": self.image_size,
            "prompt_words": list(self.prompt_words),
            "seed": self.seed,
            "backend": self.backend,
            "decode_path": self.decode_path,
            "variants": [v.to_dict() for v in self.variants],
        }


def shipped_suites() -> list[str]:
    """Names of the suites shipped in ``vlmfix/configs/bench`` (``--suite NAME``)."""
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml")) if SUITE_DIR.is_dir() else []


def load_suite(spec: str | os.PathLike | None = None) -> Suite:
    """Read and validate a suite: a YAML file, or the name of a shipped suite.

    Args:
        spec: a path, a shipped suite name (``"decode"``, ``"tiny"``) or None for the
            default suite (``decode``).

    Raises:
        ConfigError: no such file or suite, invalid YAML, or any invalid key or value
            (see :func:`parse_suite`).
    """
    import yaml

    from vlmfix.io import read_text, shipped_yaml

    spec = DEFAULT_SUITE if spec is None else spec
    path = shipped_yaml(spec, SUITE_DIR)
    if not path.is_file():
        raise ConfigError(
            f"bench suite {str(spec)!r} not found; give a YAML file or a shipped suite ({', '.join(shipped_suites())})"
        )
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return parse_suite(data, name=path.stem, source=str(path), text=text)


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_suite(data: Any, *, name: str = "suite", source: str = "", text: str = "") -> Suite:
    """Validate a suite mapping (as read from YAML) completely, before any model is built.

    Keys (all optional except ``models`` and ``variants``):

    - ``models``: names from :data:`MODELS` (``llava-1.5-7b``, ``llava-next-7b``, ``tiny``);
    - ``dtype``: ``float16`` (default), ``bfloat16`` or ``float32``;
    - ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``;
    - ``batch_sizes``: default ``[1, 8, 32]``;
    - ``new_tokens``: generated tokens per call, >= 2 (default 64);
    - ``repeats``: timed rounds (default 3);
    - ``image_size``: side of the random square images (default: per model);
    - ``prompt_words``: ``[min, max]`` words per random prompt (default ``[6, 23]``, so the
      batch is left-padded);
    - ``seed``: images and prompts;
    - ``backend``: vlmfix attention backend (``auto``, ``reference``, ``triton``);
    - ``decode_path``: default vlmfix decode path (``auto``, ``eager``, ``static``, ``graph``);
    - ``variants``: a list; each is ``stock``, ``stock_static``, ``plain``, a method name
      (that method alone), or a mapping ``{name, methods, decode_path, kind}`` where
      ``methods`` lists method names or ``{name: METHOD, OPTION: VALUE}`` mappings, as in
      the method presets.

    Raises:
        ConfigError: naming the key, the bad value and the fix.
    """
    from vlmfix import methods as registry

    where = source or name

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"bench suite {where}: {key}: {message}")

    if not isinstance(data, dict):
        raise ConfigError(f"bench suite {where}: expected a mapping of settings, got {type(data).__name__}")
    unknown = [k for k in data if k not in _DEFAULTS]
    if unknown:
        k = unknown[0]
        raise fail(str(k), f"unknown key{_suggest(k, list(_DEFAULTS))} (known keys: {', '.join(_DEFAULTS)})")
    cfg = {**_DEFAULTS, **data}

    models = cfg["models"]
    if models is None:
        raise fail(
            "models", f"missing; name the models to build, e.g. models: [llava-1.5-7b] (known: {', '.join(MODELS)})"
        )
    models = [models] if isinstance(models, str) else models
    if not isinstance(models, list) or not models:
        raise fail("models", f"{models!r} is not a list of model names; e.g. models: [llava-1.5-7b]")
    for m in models:
        if m not in MODELS:
            raise fail("models", f"unknown model {m!r}{_suggest(str(m), list(MODELS))} (known: {', '.join(MODELS)})")
    if len(set(models)) != len(models):
        raise fail("models", f"{models} names a model twice; name each once")

    for key, choices in (("dtype", DTYPES), ("backend", BACKENDS), ("decode_path", DECODE_PATHS)):
        if cfg[key] not in choices:
            raise fail(key, f"{cfg[key]!r} is not one of {', '.join(choices)}")
    if not isinstance(cfg["device"], str) or not cfg["device"]:
        raise fail("device", f"{cfg['device']!r} is not a device; use auto, cpu, cuda or cuda:N")

    batches = cfg["batch_sizes"]
    batches = [batches] if _int(batches) else batches
    if not isinstance(batches, list) or not batches:
        raise fail("batch_sizes", f"{batches!r} is not a list of batch sizes; e.g. batch_sizes: [1, 8, 32]")
    for b in batches:
        if not _int(b) or b < 1:
            raise fail(
                "batch_sizes", f"{b!r} is not a batch size; give whole numbers >= 1, e.g. batch_sizes: [1, 8, 32]"
            )
    if len(set(batches)) != len(batches):
        raise fail("batch_sizes", f"{batches} repeats a batch size; list each once")

    if not _int(cfg["new_tokens"]) or cfg["new_tokens"] < 2:
        raise fail(
            "new_tokens",
            f"{cfg['new_tokens']!r} must be a whole number >= 2 (decode ms/step is (t(N) - t(1)) / (N - 1))",
        )
    if not _int(cfg["repeats"]) or cfg["repeats"] < 1:
        raise fail("repeats", f"{cfg['repeats']!r} must be a whole number >= 1")
    if cfg["image_size"] is not None and (not _int(cfg["image_size"]) or cfg["image_size"] < 8):
        raise fail("image_size", f"{cfg['image_size']!r} must be a whole number >= 8 (pixels), or null for the model's")
    words = cfg["prompt_words"]
    if not (isinstance(words, list) and len(words) == 2 and all(_int(w) for w in words) and 1 <= words[0] <= words[1]):
        raise fail("prompt_words", f"{words!r} must be [min, max] whole numbers with 1 <= min <= max, e.g. [6, 23]")
    if not _int(cfg["seed"]):
        raise fail("seed", f"{cfg['seed']!r} must be a whole number")

    raw = cfg["variants"]
    if not isinstance(raw, list) or not raw:
        raise fail("variants", "missing or empty; list what to time, e.g. variants: [stock, stock_static, plain, vcd]")
    variants = [_parse_variant(v, i, cfg["decode_path"], registry, fail) for i, v in enumerate(raw)]
    seen: set[str] = set()
    for i, v in enumerate(variants):
        if v.name in seen:
            raise fail(f"variants[{i}]", f"the name {v.name!r} is used twice; give each variant its own name")
        seen.add(v.name)

    return Suite(
        name=name,
        models=tuple(models),
        variants=tuple(variants),
        dtype=cfg["dtype"],
        device=cfg["device"],
        batch_sizes=tuple(batches),
        new_tokens=cfg["new_tokens"],
        repeats=cfg["repeats"],
        image_size=cfg["image_size"],
        prompt_words=(words[0], words[1]),
        seed=cfg["seed"],
        backend=cfg["backend"],
        decode_path=cfg["decode_path"],
        description=str(cfg["description"] or ""),
        source=source,
        text=text,
    )


def _parse_variant(entry: Any, i: int, default_path: str, registry, fail) -> Variant:
    key = f"variants[{i}]"
    if isinstance(entry, str):
        word = entry.strip()
        if word in STOCK_KINDS:
            return Variant(word, word)
        if word == "plain":
            return Variant("plain", "vlmfix", (), default_path)
        if word.lower() in registry.available():
            return Variant(word, "vlmfix", (registry.build_config(word),), default_path)
        known = [*STOCK_KINDS, "plain", *registry.available()]
        raise fail(
            key,
            f"{entry!r} is not a variant{_suggest(word.lower(), known)}; give stock, stock_static, plain, a method "
            "name, or a mapping {name: ..., methods: [...]}",
        )
    if not isinstance(entry, dict):
        raise fail(key, f"{entry!r} is neither a name nor a mapping {{name: ..., methods: [...]}}")
    for k in entry:
        if k not in _VARIANT_KEYS:
            raise fail(f"{key}.{k}", f"unknown key{_suggest(k, _VARIANT_KEYS)} (known: {', '.join(_VARIANT_KEYS)})")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise fail(f"{key}.name", f"missing or not a string ({name!r}); every variant needs a name for the tables")
    key = f"{key} ({name})"
    kind = entry.get("kind", name if name in STOCK_KINDS else "vlmfix")
    if kind not in (*STOCK_KINDS, "vlmfix"):
        raise fail(f"{key}.kind", f"{kind!r} is not one of stock, stock_static, vlmfix")
    if kind in STOCK_KINDS:
        for k in ("methods", "decode_path"):
            if k in entry:
                raise fail(
                    f"{key}.{k}", f"applies to vlmfix variants only; drop it, or set kind: vlmfix ({kind} is stock)"
                )
        return Variant(name, kind)
    path = entry.get("decode_path", default_path)
    if path not in DECODE_PATHS:
        raise fail(f"{key}.decode_path", f"{path!r} is not one of {', '.join(DECODE_PATHS)}")
    if "methods" not in entry and name != "plain":
        raise fail(
            f"{key}.methods", "missing; list method names (e.g. methods: [var, vcd]), or methods: [] for plain vlmfix"
        )
    specs = entry.get("methods") or []
    if not isinstance(specs, list):
        raise fail(f"{key}.methods", f"{specs!r} is not a list; e.g. methods: [var, vcd] or methods: []")
    configs = []
    for j, spec in enumerate(specs):
        at = f"{key}.methods[{j}]"
        if isinstance(spec, str):
            method, options = spec, {}
        elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
            method, options = spec["name"], {k: v for k, v in spec.items() if k != "name"}
        else:
            raise fail(at, f"{spec!r} is not a method name or a mapping {{name: METHOD, OPTION: VALUE}}")
        try:
            configs.append(registry.build_config(method, options))
        except ConfigError as exc:
            raise fail(at, str(exc)) from None
    names = [c.name for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise fail(f"{key}.methods", f"{twice[0]!r} is listed twice; a method is applied once, list it once")
    return Variant(name, "vlmfix", tuple(configs), path)
