"""vlmfix: training-free hallucination mitigation for LLaVA-family models.

Importing vlmfix has no side effects: nothing is patched or registered until a method is
attached, and heavy modules (torch, transformers) load on first use.

Example:
    >>> import vlmfix
    >>> model, processor = vlmfix.load("tiny-random")  # doctest: +SKIP
    >>> out = vlmfix.generate(model, processor, [img], ["Describe the image."])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("vlmfix.loading", "load"),
    "generate": ("vlmfix.generation", "generate"),
    "GenerationOutput": ("vlmfix.generation", "GenerationOutput"),
    "attach": ("vlmfix.attachment", "attach"),
    "AttachHandle": ("vlmfix.attachment", "AttachHandle"),
    "methods": ("vlmfix.methods", None),
    "VAR": ("vlmfix.methods.var", "VAR"),
    "PAI": ("vlmfix.methods.pai", "PAI"),
    "VHR": ("vlmfix.methods.vhr", "VHR"),
    "PAINT": ("vlmfix.methods.paint", "PAINT"),
    "vhd": ("vlmfix.methods.vhr", "vhd"),
    "Baseline": ("vlmfix.methods.baseline", "Baseline"),
    "VCD": ("vlmfix.methods.vcd", "VCD"),
    "ICD": ("vlmfix.methods.icd", "ICD"),
    "M3ID": ("vlmfix.methods.m3id", "M3ID"),
    "AvisC": ("vlmfix.methods.avisc", "AvisC"),
    "PAICFG": ("vlmfix.methods.pai_cfg", "PAICFG"),
    "FastV": ("vlmfix.methods.fastv", "FastV"),
    "PyramidDrop": ("vlmfix.methods.pdrop", "PyramidDrop"),
    "TokenExit": ("vlmfix.methods.token_exit", "TokenExit"),
    "RandomPrune": ("vlmfix.methods.random_prune", "RandomPrune"),
    "VisionZip": ("vlmfix.methods.visionzip", "VisionZip"),
    "TokenMerge": ("vlmfix.methods.token_merge", "TokenMerge"),
    "DeCo": ("vlmfix.methods.deco", "DeCo"),
    "VISTA": ("vlmfix.methods.vista", "VISTA"),
    "LOL": ("vlmfix.methods.lol", "LOL"),
    "RBD": ("vlmfix.methods.rbd", "RBD"),
    "ONLY": ("vlmfix.methods.only", "ONLY"),
    "AGLA": ("vlmfix.methods.agla", "AGLA"),
    "HELPD": ("vlmfix.methods.helpd", "HELPD"),
}

__all__ = ["__version__", "load", "generate", "GenerationOutput", "attach", "AttachHandle", "methods", "Baseline"]
__all__ += ["VCD", "ICD", "M3ID", "AvisC", "PAICFG"]
__all__ += ["VAR", "PAI", "VHR", "PAINT", "vhd"]
__all__ += ["FastV", "PyramidDrop", "TokenExit", "RandomPrune", "VisionZip", "TokenMerge"]
__all__ += ["DeCo", "VISTA", "LOL", "RBD"]
__all__ += ["ONLY", "AGLA", "HELPD"]

if TYPE_CHECKING:  # pragma: no cover
    from vlmfix import methods
    from vlmfix.attachment import AttachHandle, attach
    from vlmfix.generation import GenerationOutput, generate
    from vlmfix.loading import load
    from vlmfix.methods.agla import AGLA
    from vlmfix.methods.avisc import AvisC
    from vlmfix.methods.baseline import Baseline
    from vlmfix.methods.deco import DeCo
    from vlmfix.methods.fastv import FastV
    from vlmfix.methods.helpd import HELPD
    from vlmfix.methods.icd import ICD
    from vlmfix.methods.lol import LOL
    from vlmfix.methods.m3id import M3ID
    from vlmfix.methods.only import ONLY
    from vlmfix.methods.pai import PAI
    from vlmfix.methods.pai_cfg import PAICFG
    from vlmfix.methods.paint import PAINT
    from vlmfix.methods.pdrop import PyramidDrop
    from vlmfix.methods.random_prune import RandomPrune
    from vlmfix.methods.rbd import RBD
    from vlmfix.methods.token_exit import TokenExit
    from vlmfix.methods.token_merge import TokenMerge
    from vlmfix.methods.var import VAR
    from vlmfix.methods.vcd import VCD
    from vlmfix.methods.vhr import VHR, vhd
    from vlmfix.methods.visionzip import VisionZip
    from vlmfix.methods.vista import VISTA


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vlmfix' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
