"""Contrast branches: extra rows of the same batch for contrastive decoding.

A contrastive method (VCD, ICD, M3ID, AvisC, PAI-CFG) compares the model's next-token
logits on the real input with its logits on a *contrast* input: a noised image, the
prompt without the image, a disturbed system prompt, masked image embeddings. Instead of
a second model call per step, :func:`vlmfix.generate` gives every sample one extra row
per branch in the same batch, each row with its own KV-cache rows::

    rows = [main_0 .. main_{B-1}, branch1_0 .. branch1_{B-1}, branch2_0 .. ]

All rows are tokenised together and left-padded to one length; one forward per step
serves every row; the combined logits choose one token per sample, which is appended to
all of that sample's rows. Branch rows never appear in what ``generate`` returns.

A method declares its branches with :meth:`vlmfix.methods.Method.branches` (a tuple of
:class:`BranchSpec`) and merges their logits in :meth:`vlmfix.methods.Method.combine`.
While ``generate`` runs, ``handle.controller.rows`` is the :class:`RowMap` of the batch,
so attention methods can tell main rows from branch rows. Attention methods apply to
every row, branch rows included, which is what the papers' two-call code does when a
patched model serves both calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["BranchSpec", "RowMap", "contrast", "plausible", "guidance"]


@dataclass(frozen=True)
class BranchSpec:
    """What the contrast row of each sample is fed, relative to the main row.

    Attributes:
        name: short label, used in stats and error messages.
        with_image: False builds the prompt without the image (no image tokens, no pixels).
        system: system prompt of the branch (None: the main row's, i.e. none).
        pixels: ``f(pixel_values, generator) -> pixel_values`` applied to the branch's
            normalised pixel tensor (fp32, the processor's shape) before the prefill;
            random draws must use ``generator``.
        embeds: ``f(inputs_embeds[B, T, E], prompt_length) -> inputs_embeds`` applied to the
            branch rows' LM input embeddings (image features already in place) on every
            forward that covers the prompt (the prefill; every step without a KV cache).
            Positions ``< prompt_length`` are the jointly padded prompt.
        probe: run one forward of the main rows alone before the prefill, so that the
            method can measure something (e.g. attention) that its ``embeds`` edit needs.
            ``controller.rows.probing`` is True during that forward.
        probe_only: the branch's rows take part in the probe forward only (with the main
            rows, after them), not in the prefill or the decode steps, and no logits of
            theirs reach :meth:`~vlmfix.methods.Method.combine`. For measurements that
            compare the main input with another input once per sequence (e.g. VISTA's
            image-free prompt). Must be image-free (``with_image=False``).
    """

    name: str
    with_image: bool = True
    system: str | None = None
    pixels: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    embeds: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    probe: bool = False
    probe_only: bool = False

    def __post_init__(self):
        if self.probe_only and (self.with_image or self.pixels is not None or self.embeds is not None):
            from vlmfix.errors import ConfigError

            raise ConfigError(
                f"branch {self.name!r}: probe_only rows must be image-free and unedited; pass with_image=False "
                "and no pixels / embeds"
            )


@dataclass(frozen=True)
class RowMap:
    """Which sample and branch each row of the running batch belongs to.

    Rows are grouped by branch: rows ``[0, B)`` are the main rows, rows
    ``[(k+1)B, (k+2)B)`` are branch ``k`` (in :attr:`branches` order). During the probe
    forward :attr:`branches` lists the ``probe_only`` branches, whose rows follow the
    main rows in the same way.

    Attributes:
        num_samples: ``B``, the number of prompts.
        branches: ``(method_name, branch_name)`` per branch.
        probing: True during a main-rows-only probe forward (see :attr:`BranchSpec.probe`).
    """

    num_samples: int
    branches: tuple[tuple[str, str], ...] = ()
    probing: bool = False

    @property
    def num_rows(self) -> int:
        return self.num_samples * (1 + len(self.branches))

    @property
    def main_rows(self) -> slice:
        return slice(0, self.num_samples)

    def branch_rows(self, k: int) -> slice:
        """Rows of branch ``k``."""
        return slice((k + 1) * self.num_samples, (k + 2) * self.num_samples)

    def is_main(self, device=None) -> torch.Tensor:
        """Bool ``[num_rows]``: True on main rows."""
        out = torch.zeros(self.num_rows, dtype=torch.bool, device=device)
        out[: self.num_samples] = True
        return out

    def sample_index(self, device=None) -> torch.Tensor:
        """Long ``[num_rows]``: the sample each row belongs to."""
        return torch.arange(self.num_samples, device=device).repeat(1 + len(self.branches))


def plausible(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Bool ``[B, V]``: the adaptive plausibility constraint of VCD.

    Keeps tokens whose probability is at least ``beta`` times the most likely token's,
    i.e. ``l >= log(beta) + max(l)`` on logits (the softmax normaliser cancels).
    ``beta == 0`` keeps everything.
    """
    if beta <= 0:
        return torch.ones_like(logits, dtype=torch.bool)
    return logits >= math.log(beta) + logits.max(dim=-1, keepdim=True).values


def contrast(logits: torch.Tensor, contrast_logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """VCD-style contrast ``(1 + alpha) l - alpha l'``, ``-inf`` outside :func:`plausible`.

    Args:
        logits: ``[B, V]`` fp32 logits of the main rows.
        contrast_logits: ``[B, V]`` logits of the contrast rows.
        alpha: contrast strength.
        beta: plausibility cutoff, applied to ``logits``.
    """
    out = (1 + alpha) * logits - alpha * contrast_logits.float()
    return out.masked_fill(~plausible(logits, beta), float("-inf"))


def guidance(logits: torch.Tensor, uncond_logits: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """Classifier-free guidance on log-probabilities, as in PAI:
    ``gamma (log p - log p_u) + log p_u``, ``-inf`` outside :func:`plausible`.

    Args:
        logits: ``[B, V]`` fp32 logits of the main (conditional) rows.
        uncond_logits: ``[B, V]`` logits of the unconditional rows.
        gamma: guidance scale (1 returns ``log p``).
        beta: plausibility cutoff, applied to ``logits``.
    """
    cond = torch.log_softmax(logits, dim=-1)
    uncond = torch.log_softmax(uncond_logits.float(), dim=-1)
    out = gamma * (cond - uncond) + uncond
    return out.masked_fill(~plausible(logits, beta), float("-inf"))
