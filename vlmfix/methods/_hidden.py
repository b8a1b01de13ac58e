"""Helpers shared by the hidden-state and layer-contrast methods (DeCo, VISTA).

* :func:`depth_scaled_layers` turns a layer range stated for a 32-layer LM (as the
  papers state them) into decoder-layer indices of the attached model.
* :class:`LayerOutputs` keeps, per forward, the output of chosen decoder layers through
  scoped forward hooks (registered with ``handle.add_hook``, removed by ``detach``), so
  that early-exit logits come from the same forward as the final logits.
* :func:`early_exit_logits` projects a hidden state with the LM's own head.

Layer indices are 0-based decoder-layer indices (``model.layers[i]``): "layer ``i``" is the
output of decoder layer ``i``, which transformers' ``output_hidden_states`` calls
``hidden_states[i + 1]``.
"""

from __future__ import annotations

import torch

from vlmfix.errors import ConfigError

__all__ = ["REFERENCE_DEPTH", "depth_scaled_layers", "LayerOutputs", "early_exit_logits"]

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B / LLaMA-2-7B: the depth the papers state their layers for


def depth_scaled_layers(layers: tuple[int, ...], start: int, end: int, num_layers: int, method: str) -> list[int]:
    """Decoder layers a method reads, in increasing order.

    Explicit ``layers`` (negative indices count from the end) are used as given. Otherwise
    ``range(start, end)`` is read as written for a 32-layer LM and mapped to this model's
    depth with ``floor(i * num_layers / 32)`` (duplicates dropped): on 32 layers it is the
    range itself, on a 40-layer LM ``19..27`` becomes ``23..33``.

    Raises:
        ConfigError: an explicit index outside ``[-num_layers, num_layers)``, or an empty set.
    """
    if layers:
        bad = [i for i in layers if not -num_layers <= i < num_layers]
        if bad:
            raise ConfigError(
                f"{method}: layers={tuple(layers)!r} has {bad} outside this model's {num_layers} decoder "
                f"layers; use indices in [-{num_layers}, {num_layers})"
            )
        out = sorted({i % num_layers for i in layers})
    else:
        out = sorted({min(num_layers - 1, i * num_layers // REFERENCE_DEPTH) for i in range(start, end)})
    if not out:
        raise ConfigError(f"{method}: the layer range start_layer={start}, end_layer={end} is empty; widen it")
    return out


class LayerOutputs:
    """Outputs ``[B, T', D]`` of chosen decoder layers in the forward that ran last.

    Only the positions the model turns into logits are kept: the last ``logits_to_keep``
    (read from each forward's kwargs; ``vlmfix.generate`` asks for 1), or every position
    when all logits are requested. Kept slices are copies, so the full activations are
    freed as usual.
    """

    def __init__(self, handle, layers: list[int]):
        self.layers = list(layers)
        self.outputs: dict[int, torch.Tensor] = {}
        self._keep = 1
        decoder = handle.adapter.decoder_layers(handle.model)
        handle.add_hook(handle.model.register_forward_pre_hook(self._read_keep, with_kwargs=True))
        for i in self.layers:
            handle.add_hook(decoder[i].register_forward_hook(self._keep_output(i)))

    def _read_keep(self, module, args, kwargs):
        keep = kwargs.get("logits_to_keep", 0)
        self._keep = keep if isinstance(keep, int) else 0  # index tensors: keep everything

    def _keep_output(self, i: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            self.outputs[i] = h[:, -self._keep :].clone() if self._keep > 0 else h

        return hook

    def last(self, i: int, rows: slice | None = None) -> torch.Tensor:
        """Layer ``i``'s output at the last position, ``[B, D]`` (optionally some rows)."""
        h = self.get(i)[:, -1, :]
        return h if rows is None else h[rows]

    def get(self, i: int) -> torch.Tensor:
        """Layer ``i``'s kept output ``[B, T', D]``."""
        if i not in self.outputs:
            from vlmfix.errors import StateError

            raise StateError(f"no output of decoder layer {i} was recorded; the model has not run a forward")
        return self.outputs[i]

    def clear(self) -> None:
        self.outputs.clear()


def early_exit_logits(handle, hidden: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
    """``lm_head(norm(hidden))`` (or ``lm_head(hidden)``) in the model's dtype, returned as fp32.

    The head's weights are applied directly (``F.linear``), so hooks that other methods put
    on ``lm_head`` (VISTA's logit mixing) do not fire for early-exit projections. On a model
    spread over devices with a ``device_map``, the hidden state is moved to where the norm
    and the head run (accelerate's own hooks load offloaded weights for the projection), so
    the result sits on the head's device: callers move it next to their logits.

    Args:
        handle: the :class:`~vlmfix.attachment.AttachHandle`.
        hidden: ``[..., D]`` hidden states.
        final_norm: apply the LM's final norm first, as the model does for its last layer.

    Returns:
        fp32 ``[..., V]`` on the head's device.
    """
    if final_norm:
        norm = handle.adapter.get(handle.model, "final_norm")
        if getattr(norm, "_hf_hook", None) is None:  # with a hook, the norm's call moves the input
            hidden = hidden.to(_weight_device(norm, hidden.device))
        hidden = norm(hidden)
    head = handle.adapter.get(handle.model, "lm_head")
    hook = getattr(head, "_hf_hook", None)
    if hook is None:
        hidden = hidden.to(head.weight.device)
        return torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    # device_map: run accelerate's hook around the projection, as a forward of the head does
    # (input to the execution device; offloaded weights loaded, then released).
    (hidden,), _ = hook.pre_forward(head, hidden)
    out = torch.nn.functional.linear(hidden, head.weight, head.bias)
    hook.post_forward(head, out)
    return out.float()


def _weight_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return default
