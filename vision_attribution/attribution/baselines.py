"""Baselines x' and the noisy inputs of SmoothGrad, as tensors in the model's input space.

Baselines are defined on the image's values v in [0, 1] per channel (the colour channels, and dextr's points
heatmap as a fourth), which an archive maps to its input space by an affine ValueScale, x = (v - offset) / scale:

    zeros, mean   the input that normalises to zero: the training mean image (the seeds' baseline)
    black, white  v = 0 and v = 1
    black_and_white  both, two paths (XRAI's baselines)
    blur          the input blurred by a Gaussian of `sigma` model-input pixels, reflected at the borders
    uniform       v ~ U[0, 1], independently per value
    gaussian      v = clip(v(x) + N(0, sigma^2), 0, 1): noise around the input
    image         uploaded images, prepared like the input (the caller passes them)

Random draws come from a CPU torch.Generator that the caller seeds with the request's seed (baselines first, then
SmoothGrad's noise), so that a reply can be reproduced on any device; K baselines are drawn in one call, (K, C, H, W).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DETERMINISTIC_BASELINES = ("zeros", "mean", "black", "white", "blur")
BLACK_AND_WHITE = "black_and_white"
RANDOM_BASELINES = ("uniform", "gaussian")
UPLOADED_BASELINE = "image"
BASELINE_KINDS = DETERMINISTIC_BASELINES + (BLACK_AND_WHITE,) + RANDOM_BASELINES + (UPLOADED_BASELINE,)
DEFAULT_SIGMA = {"blur": 10.0, "gaussian": 0.1}
"""blur: sigma in model-input pixels; gaussian: sigma as a fraction of the value range [0, 1]."""
GAUSSIAN_TRUNCATE = 4.0
"""The blur kernel reaches 4 sigma on each side (scipy.ndimage.gaussian_filter's default)."""


@dataclass(frozen=True)
class ValueScale:
    """The affine map from image values v in [0, 1] to the model's input: x = (v - offset) / scale, per channel.
    offset, scale: (C,) sequences."""

    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def _columns(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, len(self.offset), 1, 1)
        return (torch.tensor(self.offset, dtype=like.dtype, device=like.device).view(shape),
                torch.tensor(self.scale, dtype=like.dtype, device=like.device).view(shape))  # fmt: skip

    def to_model(self, values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) values in [0, 1] -> the model's input space."""
        offset, scale = self._columns(values)
        return (values - offset) / scale

    def to_values(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) model inputs -> image values (in [0, 1] for an image)."""
        offset, scale = self._columns(inputs)
        return inputs * scale + offset


def reflected_indices(length: int, radius: int) -> torch.Tensor:
    """Indices -radius .. length - 1 + radius folded into 0 .. length - 1 by half-sample symmetry (d c b a | a b c d |
    d c b a, scipy.ndimage's 'reflect'), repeating for a radius longer than the signal. (length + 2 radius,) int64."""
    positions = torch.arange(-radius, length + radius) % (2 * length)
    return torch.where(positions < length, positions, 2 * length - 1 - positions)


def gaussian_blur(images: torch.Tensor, sigma: float, mode: str = "reflect") -> torch.Tensor:
    """(B, C, H, W) blurred per channel by a separable Gaussian of std `sigma` pixels, truncated at 4 sigma and
    normalised to sum 1: scipy.ndimage.gaussian_filter per channel, with its `mode` "reflect" (half-sample symmetric
    borders) or "constant" (zeros outside). sigma 0 returns the images unchanged."""
    if sigma <= 0:
        return images
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype).to(images.device)
    batch, channels, height, width = images.shape
    planes = images.reshape(batch * channels, 1, height, width)
    if mode == "constant":
        planes = F.conv2d(F.pad(planes, (0, 0, radius, radius)), kernel.view(1, 1, -1, 1))
        planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0)), kernel.view(1, 1, 1, -1))
    elif mode == "reflect":
        planes = F.conv2d(planes[:, :, reflected_indices(height, radius).to(images.device), :], kernel.view(1, 1, -1, 1))
        planes = F.conv2d(planes[:, :, :, reflected_indices(width, radius).to(images.device)], kernel.view(1, 1, 1, -1))
    else:
        raise ValueError(f"mode must be reflect or constant, got {mode!r}")
    return planes.reshape(batch, channels, height, width)


def draw_baselines(
    kind: str, inputs: torch.Tensor, scale: ValueScale, mean_input: torch.Tensor, count: int, sigma: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """`count` baselines of `kind` for inputs (1, C, H, W) -> (count, C, H, W), in the inputs' dtype and device.
    mean_input: (1, C, H, W), the input that normalises to zero. sigma: of blur or gaussian (DEFAULT_SIGMA if None).
    Deterministic kinds repeat one baseline, black_and_white gives black then white (count 2); random kinds draw
    `count` from `generator` (a CPU generator)."""
    if kind == UPLOADED_BASELINE:
        raise ValueError("uploaded baselines are prepared by the caller, like the input")
    sigma = DEFAULT_SIGMA.get(kind) if sigma is None else sigma
    shape = (count, *inputs.shape[1:])
    if kind in ("zeros", "mean"):
        return mean_input.expand(shape).clone()
    if kind in ("black", "white", BLACK_AND_WHITE):
        levels = {"black": [0.0] * count, "white": [1.0] * count, BLACK_AND_WHITE: [0.0, 1.0]}[kind]
        values = torch.tensor(levels, dtype=inputs.dtype, device=inputs.device).view(-1, 1, 1, 1).expand(len(levels), *inputs.shape[1:])
        return scale.to_model(values)
    if kind == "blur":
        return gaussian_blur(inputs, sigma).expand(shape).clone()
    if kind == "uniform":
        values = torch.rand(shape, generator=generator, dtype=torch.float32)
    elif kind == "gaussian":
        noise = torch.randn(shape, generator=generator, dtype=torch.float32) * sigma
        values = (scale.to_values(inputs).float().cpu() + noise).clamp(0.0, 1.0)
    else:
        raise ValueError(f"unknown baseline kind {kind!r}; kinds are {BASELINE_KINDS}")
    return scale.to_model(values.to(inputs.device, inputs.dtype))


def noisy_inputs(inputs: torch.Tensor, stdev: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """SmoothGrad's inputs: (1, C, H, W) -> (count, C, H, W) = x + N(0, s^2), s = stdev * (max(x) - min(x)) (the
    noise level relative to the input's range, as Smilkov et al.), drawn from `generator` (a CPU generator)."""
    noise = torch.randn((count, *inputs.shape[1:]), generator=generator, dtype=torch.float32)
    return inputs + (noise * absolute_noise_stdev(inputs, stdev)).to(inputs.device, inputs.dtype)


def absolute_noise_stdev(inputs: torch.Tensor, stdev: float) -> float:
    """The noise's standard deviation in the model's input space for a relative `stdev`: stdev * (max(x) - min(x))."""
    return stdev * float(inputs.max() - inputs.min())
