"""Blur IG's path (Xu et al., CVPR 2020): through Gaussian scale space, from the maximally blurred input to the input.

    x(alpha) = blur(x, sigma(alpha)),  sigma(alpha) = (1 - alpha) * max_sigma,  dx/dalpha = -max_sigma * d blur / d sigma

with d blur / d sigma taken as Google PAIR's saliency.core.BlurIG takes it, a forward difference of `grad_step`
(blur(x, sigma + h) - blur(x, sigma)) / h, and the blur as there: scipy.ndimage.gaussian_filter(mode="constant"),
zeros outside the image. The blurs are computed in float64 and the points cast to the input's dtype.
"""
from dataclasses import dataclass

import torch

from .baselines import gaussian_blur

BLUR_MODE = "constant"
DEFAULT_MAX_SIGMA = 50.0
DEFAULT_GRAD_STEP = 0.01


@dataclass(frozen=True)
class BlurPath:
    """A CurvedPath (engine.py). inputs: (1, C, H, W); max_sigma and grad_step in model-input pixels."""

    inputs: torch.Tensor
    max_sigma: float = DEFAULT_MAX_SIGMA
    grad_step: float = DEFAULT_GRAD_STEP

    def blurred(self, sigma: float) -> torch.Tensor:
        """(1, C, H, W) float64: the input blurred by sigma."""
        return gaussian_blur(self.inputs.double(), sigma, BLUR_MODE)

    def start(self) -> torch.Tensor:
        """x(0), the maximally blurred input, (1, C, H, W) in the input's dtype."""
        return self.blurred(self.max_sigma).to(self.inputs.dtype)

    def evaluate(self, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alphas (b,) -> points x(alpha) (b, C, H, W) (alpha 1: the input exactly) and velocities dx/dalpha."""
        points, velocities = [], []
        for alpha in alphas.tolist():
            sigma = (1.0 - alpha) * self.max_sigma
            here = self.inputs.double() if sigma <= 0 else self.blurred(sigma)
            derivative = (self.blurred(sigma + self.grad_step) - here) / self.grad_step
            points.append(self.inputs if sigma <= 0 else here.to(self.inputs.dtype))
            velocities.append((-self.max_sigma * derivative).to(self.inputs.dtype))
        return torch.cat(points), torch.cat(velocities)
