"""Loading LLaVA-family checkpoints: :func:`vlmfix.load`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from vlmfix.adapters import ADAPTERS, get_adapter, supported_model_types
from vlmfix.errors import ConfigError, ModelNotFoundError, UnsupportedModelError

__all__ = ["load", "resolve_dtype", "model_id"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype) -> torch.dtype | str:
    """Map ``"bfloat16"``/``"bf16"``/``torch.bfloat16``/``"auto"`` to what transformers expects."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"dtype={dtype!r} is not supported; use one of {sorted(set(_DTYPES))} or 'auto'")


def model_id(model) -> str:
    """The name a model was loaded under (checkpoint path, hub id or built-in name)."""
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


def _read_model_type(folder: Path) -> str:
    cfg = folder / "config.json"
    if not cfg.exists():
        raise ModelNotFoundError(f"{str(folder)!r} has no config.json; pass a Hugging Face model folder")
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except ValueError as exc:
        raise ModelNotFoundError(f"{cfg}: not valid JSON ({exc})") from None


def load(
    name_or_path: str | os.PathLike = "testbed",
    *,
    dtype="auto",
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
):
    """Load a supported model and its processor.

    Args:
        name_or_path: a local Hugging Face folder, a hub id (needs network or a filled
            cache), ``"testbed"`` / ``"testbed:VARIANT"`` (vlmfix's shipped model organism)
            or ``"tiny-random"`` / ``"tiny-random:FAMILY"`` (random tiny model, for tests).
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        device: where to put the model (default: CUDA if available, else CPU).
        attn_implementation: initial attention of every sub-model (``"sdpa"`` or ``"eager"``).

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        UnsupportedModelError: the checkpoint is not LLaVA / LLaVA-NeXT / LLaVA-OneVision.
        ModelNotFoundError: the name resolves to nothing (offline: pass a local path).
    """
    import transformers
    from transformers import AutoProcessor

    torch_dtype = resolve_dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = str(name_or_path)

    if name.startswith("tiny-random"):
        from vlmfix.testing import build_tiny

        family = name.split(":", 1)[1] if ":" in name else "llava"
        model, processor = build_tiny(
            family,
            dtype=torch.float32 if torch_dtype == "auto" else torch_dtype,
            attn_implementation=attn_implementation,
        )
        return model.to(device), processor

    if name == "testbed" or name.startswith("testbed:"):
        from vlmfix import testbed

        variant = name.split(":", 1)[1] if ":" in name else None
        folder = Path(testbed.model_path(variant) if variant else testbed.model_path())
    else:
        folder = Path(name).expanduser()

    if folder.is_dir():
        model_type = _read_model_type(folder)
        source = str(folder)
    else:
        looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
        if looks_local:
            raise ModelNotFoundError(f"model path {name!r} does not exist")
        try:
            config = transformers.AutoConfig.from_pretrained(name)
        except OSError as exc:
            raise ModelNotFoundError(
                f"could not load {name!r} from the Hugging Face hub or its cache ({exc.__class__.__name__}). "
                "Offline, download the checkpoint elsewhere and pass its local folder instead."
            ) from None
        model_type = config.model_type
        source = name
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"{name!r} is a {model_type!r} model; vlmfix supports {', '.join(supported_model_types())}"
        )
    adapter = ADAPTERS[model_type]
    model_cls = getattr(transformers, adapter.model_class)
    model = model_cls.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation)
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(source)
    get_adapter(model)  # validates the loaded class once more
    return model, processor
