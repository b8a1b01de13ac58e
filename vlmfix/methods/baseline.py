"""The no-op method: plain decoding through vlmfix's machinery (the control arm)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmfix.methods import register
from vlmfix.methods.base import Method, MethodConfig


@register
@dataclass(frozen=True)
class Baseline(MethodConfig):
    """Plain decoding; changes nothing. Useful as the reference arm of comparisons."""

    name: ClassVar[str] = "baseline"

    def build(self) -> Method:
        return Method(self)
