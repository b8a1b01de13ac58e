"""Every touch of private or version-dependent transformers API, in one place.

vlmfix supports transformers ``>=5.17,<6``. Inside that range some names moved:

* the KV cache is passed to a model's ``forward`` as ``cache=`` from 5.24 on, and as
  ``past_key_values=`` before (5.24 deprecates the old name; removal is announced for
  5.40);
* registering an attention or mask function globally has a public ``register`` but no
  public way to unregister it;
* a config's attention implementation is stored in ``_attn_implementation_internal``
  (the public ``_attn_implementation`` property normalises ``None`` to a default, so a
  bit-for-bit restore must read and write the private field);
* the any-res grid helpers live in the LLaVA-NeXT modeling module;
* whether ``generate`` compiled a model's decode step (static cache on CUDA) shows only
  in the private ``_compiled_call`` it keeps on the model.

Nothing else in vlmfix touches these; when a release moves one, this module is the only
place to change. Tests run against the oldest (5.17) and the newest 5.x release.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = [
    "CACHE_KWARGS",
    "cache_kwarg",
    "cache_from_kwargs",
    "cache_length",
    "reorder_cache",
    "get_attn_impl",
    "set_attn_impl",
    "register_attention",
    "unregister_attention",
    "registered_attention",
    "sdpa_bool_mask",
    "select_best_resolution",
    "image_size_to_num_patches",
    "anyres_grid_shape",
    "unpad_image",
    "generate_compiled",
]

# Every name under which a model's forward may receive the KV cache, newest first.
CACHE_KWARGS = ("cache", "past_key_values")


@functools.cache
def _cache_kwarg_of(forward) -> str:
    params = inspect.signature(forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    return "past_key_values"


def cache_kwarg(model) -> str:
    """The keyword under which ``model``'s forward takes the KV cache (``"cache"`` on
    transformers >= 5.24, ``"past_key_values"`` before)."""
    return _cache_kwarg_of(type(model).forward)


def cache_from_kwargs(kwargs: dict[str, Any]):
    """The cache object of a forward call's kwargs, under whichever name it was passed."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cache_length(cache) -> int:
    """Number of positions already in ``cache`` (0 for no cache or an empty one)."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def reorder_cache(cache, index) -> None:
    """Reorder the batch rows of a KV cache in place: row ``r`` becomes old row ``index[r]``
    (beam search). ``Cache.reorder_cache`` has this meaning on 5.17 through 5.x."""
    if not hasattr(cache, "reorder_cache"):
        from vlmfix.errors import StateError

        raise StateError(f"{type(cache).__name__} cannot reorder its rows; beam search needs a DynamicCache")
    cache.reorder_cache(index)


def get_attn_impl(config) -> Any:
    """The exact stored attention implementation of one (sub-)config (may be None)."""
    return config._attn_implementation_internal


def set_attn_impl(config, value: Any) -> None:
    """Write back an exact attention implementation (used to restore a snapshot)."""
    config._attn_implementation_internal = value


def _interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionInterface, AttentionMaskInterface


def registered_attention(name: str):
    """``(attention_fn, mask_fn)`` registered globally under ``name`` (None where absent)."""
    attn, mask = _interfaces()
    return attn._global_mapping.get(name), mask._global_mapping.get(name)


def register_attention(name: str, attention_fn, mask_fn) -> None:
    """Register an attention function and its mask function globally under ``name``."""
    attn, mask = _interfaces()
    attn.register(name, attention_fn)
    mask.register(name, mask_fn)


def unregister_attention(name: str) -> None:
    """Remove a global registration (transformers has no public call for this)."""
    attn, mask = _interfaces()
    attn._global_mapping.pop(name, None)
    mask._global_mapping.pop(name, None)


def sdpa_bool_mask(*args, **kwargs):
    """transformers' boolean sdpa mask, always materialised (never skipped for
    ``is_causal``), so the attention function knows exactly which keys each query sees."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def select_best_resolution(original_size, possible_resolutions):
    from transformers.image_processing_utils import select_best_resolution as _select

    return _select(original_size, possible_resolutions)


def image_size_to_num_patches(image_size, grid_pinpoints, patch_size: int) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches as _n

    return int(_n(image_size=image_size, grid_pinpoints=grid_pinpoints, patch_size=patch_size))


def anyres_grid_shape(image_size, grid_pinpoints, patch_size: int) -> tuple[int, int]:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size)


def unpad_image(tensor, original_size):
    from transformers.models.llava_next.modeling_llava_next import unpad_image as _unpad

    return _unpad(tensor, original_size)


def generate_compiled(model) -> bool:
    """Whether transformers' ``generate`` has compiled ``model``'s forward (it does so for a
    static cache on CUDA, and keeps the compiled call on the model)."""
    return getattr(model, "_compiled_call", None) is not None
