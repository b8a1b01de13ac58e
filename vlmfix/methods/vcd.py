"""VCD: Visual Contrastive Decoding (Leng et al., CVPR 2024, arXiv:2311.16922).

The contrast row sees the image after ``T`` steps of the DDPM forward process,
``x_T = sqrt(abar_T) x_0 + sqrt(1 - abar_T) eps``, applied to the *normalised* pixel
tensor (as the released code does). Logits are contrasted as ``(1 + alpha) l - alpha l'``
and masked to ``-inf`` where ``p < beta * max p`` (the adaptive plausibility constraint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmfix.branches import BranchSpec, contrast
from vlmfix.methods import register
from vlmfix.methods.base import Method, MethodConfig, help_field

__all__ = ["VCD", "diffusion_noise"]


def diffusion_noise(pixel_values: torch.Tensor, step: int, generator: torch.Generator, num_steps: int = 1000):
    """Noise images with ``step`` steps of VCD's diffusion schedule.

    ``betas = sigmoid(linspace(-6, 6, num_steps)) * (5e-3 - 1e-5) + 1e-5``,
    ``abar = cumprod(1 - betas)``; returns ``sqrt(abar_T) x + sqrt(1 - abar_T) eps`` with
    ``eps ~ N(0, 1)`` drawn from ``generator`` in fp32. ``abar_T`` is ``abar[step]``
    (0-based), as the released code indexes ``alphas_bar_sqrt[noise_step]``.

    Args:
        pixel_values: normalised pixels, any shape (``[N, 3, H, W]`` or ``[N, P, 3, H, W]``).
        step: noise step ``T`` in ``[0, num_steps)``.
        generator: seeded generator on the pixels' device.
        num_steps: length of the schedule.
    """
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[step].item()
    x = pixel_values.float()
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return abar**0.5 * x + (1 - abar) ** 0.5 * eps


@register
@dataclass(frozen=True)
class VCD(MethodConfig):
    """Visual Contrastive Decoding: contrast with the logits of a noised image.

    ``noise_step=500`` indexes the 1000-long ``cumprod(1 - betas)`` at 500 (0-based), as
    the released code does. The paper samples (temperature 1, top-p 1); greedy works too.
    The noise is drawn from ``generate``'s seeded generator before decoding starts.
    """

    name: ClassVar[str] = "vcd"
    order: ClassVar[int] = 300
    paper: ClassVar[str] = "https://arxiv.org/abs/2311.16922"

    alpha: float = help_field(1.0, "contrast strength: (1 + alpha) * l - alpha * l_noised")
    beta: float = help_field(0.1, "plausibility cutoff: keep tokens with p >= beta * max p (0 keeps all)")
    noise_step: int = help_field(500, "diffusion step T of the noised image (of num_steps)")
    num_steps: int = help_field(1000, "length of the diffusion noise schedule")

    def __post_init__(self):
        self._check(self.alpha >= 0, "alpha", ">= 0")
        self._check(0 <= self.beta < 1, "beta", "in [0, 1)")
        self._check(self.num_steps >= 1, "num_steps", ">= 1")
        self._check(0 <= self.noise_step < self.num_steps, "noise_step", f"in [0, num_steps={self.num_steps})")

    def build(self) -> Method:
        return VCDMethod(self)


class VCDMethod(Method):
    graph_reusable = True  # stateless combine: a captured step serves later calls

    def branches(self) -> tuple[BranchSpec, ...]:
        cfg = self.config
        return (
            BranchSpec(
                "noised_image",
                pixels=lambda px, g: diffusion_noise(px, cfg.noise_step, g, cfg.num_steps),
            ),
        )

    def combine(self, step, logits, branch_logits):
        return contrast(logits, branch_logits[0], self.config.alpha, self.config.beta)
