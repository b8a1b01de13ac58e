"""Shared fixtures: tiny offline LLaVA-family models and deterministic test images."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llava", "llava_next", "llava_onevision")

_MODELS: dict = {}


def tiny(family: str):
    """A cached tiny model + processor (built once per test session)."""
    if family not in _MODELS:
        from vlmfix.testing import build_tiny

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _MODELS[family] = build_tiny(family)
    return _MODELS[family]


def make_images(n: int, seed: int = 0):
    """``n`` random RGB images of different sizes and aspect ratios."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (70, 30), (32, 32), (45, 90), (64, 64)]
    return [Image.fromarray((rng.random((*sizes[i % len(sizes)], 3)) * 255).astype("uint8")) for i in range(n)]


PROMPTS = [
    "describe the image .",
    "is there a dog in the image ? answer the question using a single word or phrase .",
    "what",
    "is there a cat ?",
    "describe this photo",
]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def images():
    return make_images(5)
