"""Loading LLaVA-family checkpoints: :func:`vlmfix.load`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from vlmfix.adapters import ADAPTERS, get_adapter, supported_model_types
from vlmfix.errors import ConfigError, ModelNotFoundError, UnsupportedModelError

__all__ = ["load", "resolve_dtype", "model_id", "input_device", "placement"]

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


def input_device(model) -> torch.device:
    """The device a forward's inputs go to: where the input embeddings run.

    A model on one device: that device. A model split over devices with a ``device_map``
    (accelerate hooks move activations between them and return the outputs on the
    inputs' device): the device of the input embeddings, or their execution device when
    their weights are offloaded (``meta`` until the forward).
    """
    emb = model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    for module in (emb, model):
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def devices(model) -> set[str]:
    """Every device the model's layers sit on: its input device, plus those of its
    ``device_map`` (``"cuda:0"``, ``"cpu"``, ``"disk"`` ...)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return {f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values()} | {str(input_device(model))}


def placement(model) -> str:
    """Where the model runs, as recorded in run metadata: ``"cuda:0"``, or the devices of
    its ``device_map`` (``"cuda:0+cuda:1"``, ``"cuda:0+cpu+disk"``)."""
    first = str(input_device(model))
    found = devices(model)
    if len(found) > 1:
        return "+".join(sorted(found, key=lambda d: (not d.startswith("cuda"), d != "cpu", d)))
    return first


def _dispatch(model, device_map, max_memory, offload_folder):
    """Spread an in-memory model (``tiny-random``) over devices, as ``from_pretrained``
    does for a checkpoint."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=model._no_split_modules or []
        )
    devices = set(device_map.values())
    if len(devices) == 1 and "disk" not in devices:  # one device: no hooks, as transformers does
        model.hf_device_map = dict(device_map)
        return model.to(next(iter(devices)))
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder)


def load(
    name_or_path: str | os.PathLike = "testbed",
    *,
    dtype="auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
):
    """Load a supported model and its processor.

    Args:
        name_or_path: a local Hugging Face folder, a hub id (needs network or a filled
            cache), ``"testbed"`` / ``"testbed:VARIANT"`` (vlmfix's shipped model organism)
            or ``"tiny-random"`` / ``"tiny-random:FAMILY"`` (random tiny model, for tests).
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        device: where to put the model (default: CUDA if available, else CPU).
        device_map: instead of ``device``, spread the model over several devices, for
            models that do not fit one GPU: ``"auto"`` (every visible GPU, then CPU
            memory), ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, or a dict
            ``{module name: device}`` (transformers / accelerate semantics). Inputs go to
            the input embeddings' device (:func:`input_device`); accelerate moves the
            activations between layers.
        max_memory: with ``device_map``: memory per device, e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
        offload_folder: with ``device_map``: where weights that fit nowhere are offloaded.
        attn_implementation: initial attention of every sub-model (``"sdpa"`` or ``"eager"``).

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        UnsupportedModelError: the checkpoint is not LLaVA / LLaVA-NeXT / LLaVA-OneVision.
        ModelNotFoundError: the name resolves to nothing (offline: pass a local path).
        ConfigError: both ``device`` and ``device_map``, or ``max_memory`` /
            ``offload_folder`` without ``device_map``.

    Example:
        >>> model, processor = vlmfix.load("llava-hf/llava-1.5-13b-hf", dtype="float16", device_map="auto")  # doctest: +SKIP
    """
    import transformers
    from transformers import AutoProcessor

    torch_dtype = resolve_dtype(dtype)
    if device_map is not None and device is not None:
        raise ConfigError(f"device={device!r} and device_map={device_map!r} both place the model; pass one of them")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ConfigError("max_memory and offload_folder only apply with device_map (e.g. device_map='auto')")
    if device is None and device_map is None:
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
        if device_map is not None:
            return _dispatch(model, device_map, max_memory, offload_folder), processor
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
    placing = {}
    if device_map is not None:
        placing = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    model = model_cls.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation, **placing)
    if device_map is None:
        model = model.to(device)
    model = model.eval()
    processor = AutoProcessor.from_pretrained(source)
    get_adapter(model)  # validates the loaded class once more
    return model, processor
