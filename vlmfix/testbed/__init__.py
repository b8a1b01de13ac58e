"""vlmfix's testbed: a small LLaVA whose hallucinations have a known cause.

A synthetic scene world (:mod:`.scenes`: 64x64 glyph scenes, COCO-format annotations,
six directed co-occurrence priors, captions and yes/no QA) and a ~4M-parameter HF
``LlavaForConditionalGeneration`` trained on it (:mod:`.train`), in four shipped variants:

- ``clean``: truthful training data;
- ``caption_noise`` (default): training captions name the absent partner B of a
  present A (``fork`` -> ``knife``) in 60% of such scenes;
- ``occlusion_prior``: partners hidden under A are annotated present;
- ``under_attention`` (testbed v2): an LM trained on text first, then briefly with images,
  that looks at the image less and names absent partners from the text prior.

``attention_sink`` is defined but not shipped (its recipe has not produced massive
activations).

The shipped weights live in ``vlmfix/testbed/models/<variant>/``; :func:`model_path`
finds them. This module imports no torch: the heavy parts are submodules.

Example:
    >>> from vlmfix.testbed import model_path
    >>> from transformers import AutoProcessor, LlavaForConditionalGeneration
    >>> path = model_path("caption_noise")  # doctest: +SKIP
    >>> model = LlavaForConditionalGeneration.from_pretrained(path)  # doctest: +SKIP
    >>> processor = AutoProcessor.from_pretrained(path)  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
from pathlib import Path

from vlmfix.errors import ConfigError, ModelNotFoundError
from vlmfix.testbed.catalog import DEFAULT_VARIANT, VARIANTS

__all__ = ["VARIANTS", "DEFAULT_VARIANT", "MODELS_DIR", "EXAMPLES_DIR", "model_path", "available_variants"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def model_path(variant: str = DEFAULT_VARIANT) -> Path:
    """Folder of the shipped testbed model ``variant`` (HF model + processor files).

    Args:
        variant: one of :data:`VARIANTS` (``"clean"``, ``"caption_noise"``,
            ``"occlusion_prior"``, ``"under_attention"``; ``"attention_sink"`` is not shipped).

    Returns:
        The folder, loadable with ``LlavaForConditionalGeneration.from_pretrained`` and
        ``AutoProcessor.from_pretrained``.

    Raises:
        ConfigError: ``variant`` is not a testbed variant.
        ModelNotFoundError: the variant's weights are not in the package; the message
            names the command that trains them.
    """
    if variant not in VARIANTS:
        close = difflib.get_close_matches(str(variant), VARIANTS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown testbed variant {variant!r}; choose one of {', '.join(VARIANTS)}.{hint}")
    path = MODELS_DIR / variant
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelNotFoundError(
            f"testbed variant {variant!r} has no weights at {path}. Train them (about 3 minutes on "
            f"one GPU) with: python scripts/train_testbed.py --variant {variant} --out {path}"
        )
    return path


def available_variants() -> list[str]:
    """Variants whose weights are present in this installation."""
    return [v for v in VARIANTS if (MODELS_DIR / v / "config.json").is_file()]
