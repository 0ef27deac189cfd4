"""Input preparation for models with a fixed input size: resize, scale to [0, 1], normalise."""
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .base import ModelInput
from ..attribution.baselines import ValueScale
from ..formats.decode import PixelLayout
from ..formats.errors import RequestError

RGB_ROWS = PixelLayout(axes="HWC", order="RGB", grey_and_alpha=True)


def resize_image(image: np.ndarray, size: tuple[int, int], mode: str) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Resize (H, W, 3) uint8 to size=(h, w) bilinearly; mode "stretch" ignores the aspect ratio, "center_crop"
    scales the shorter side to 8/7 of the target and crops the centre (ImageNet evaluation). Returns the
    resized image and the (left, top, right, bottom) region of the original that it shows."""
    height, width = image.shape[:2]
    picture = Image.fromarray(image)
    if mode == "stretch":
        return np.asarray(picture.resize((size[1], size[0]), Image.BILINEAR)), (0.0, 0.0, float(width), float(height))
    scale = max(size) * 8 / 7 / min(height, width)
    scaled_w, scaled_h = max(size[1], round(width * scale)), max(size[0], round(height * scale))
    left, top = (scaled_w - size[1]) // 2, (scaled_h - size[0]) // 2
    region = (left / scaled_w * width, top / scaled_h * height, (left + size[1]) / scaled_w * width, (top + size[0]) / scaled_h * height)
    # Resample only the kept region: scaling the whole image first would allocate scaled_w x scaled_h pixels,
    # gigabytes for an elongated image (2 x 30000 pixels scale to 3,840,000 x 256).
    return np.asarray(picture.resize((size[1], size[0]), Image.BILINEAR, box=region)), region


def class_by_name_or_index(target, class_names: Sequence[str]) -> int:
    """A class name or index -> index; an unknown name or an index out of range is a 400."""
    if isinstance(target, int):
        if not 0 <= target < len(class_names):
            raise RequestError(f"class index {target} is out of range 0..{len(class_names) - 1}")
        return target
    if target in class_names:
        return list(class_names).index(target)
    shown = list(class_names) if len(class_names) <= 25 else list(class_names[:25]) + ["..."]
    raise RequestError(f"unknown class {target!r}; classes are {shown} (or give an index)")


class FixedSizeInput:
    """Prepares (H, W, 3) uint8 RGB images as (1, 3, h, w) normalised tensors: (pixels / 255 - mean) / std."""

    seed_layout = RGB_ROWS

    def __init__(self, input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], device: torch.device, resize_mode: str = "stretch"):
        self.input_size = input_size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.value_scale = ValueScale(tuple(mean), tuple(std))
        self.device = device
        self.resize_mode = resize_mode

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) values in [0, 1] -> the model's input space."""
        return (pixels - self.mean) / self.std

    def prepare(self, image: np.ndarray, options: dict) -> ModelInput:
        resized, region = resize_image(image, self.input_size, self.resize_mode)
        pixels = torch.from_numpy(np.array(resized)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        return ModelInput(tensor=self.normalise(pixels), image=image, region=region)

    def mean_input(self, model_input: ModelInput) -> torch.Tensor:
        """Zero in the normalised space: the training mean image (the seeds' baseline)."""
        return torch.zeros_like(model_input.tensor)
