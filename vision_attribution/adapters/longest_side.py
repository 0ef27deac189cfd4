"""Semantic segmenters that see the whole image at its own aspect ratio, resized as MAX Image Segmenter did:
the longest side to `image_size` pixels, LANCZOS. Their predictions add MAX's `seg_map` and `image_size`.
"""
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .base import ModelInput
from .semantic import SemanticSegmenterAdapter

MAX_IMAGE_SIZES = (16, 1024)
"""The longest sides MAX Image Segmenter accepted (IMAGE_SIZE)."""
DEFAULT_IMAGE_SIZE = 513


def longest_side_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) of the model input: MAX's arithmetic (ratio = image_size / longest side, each side
    truncated), except that a side never drops below 1 pixel (MAX's 0-pixel side of very elongated images)."""
    ratio = 1.0 * image_size / max(width, height)
    return max(1, int(ratio * width)), max(1, int(ratio * height))


class LongestSideSegmenterAdapter(SemanticSegmenterAdapter):
    """Serves `logits_of(x)`: (B, 3, h, w) normalised RGB -> (B, K, h, w) logits, for any h, w; the input is
    the image resized so that its longest side is `image_size` (per request: option `image_size`)."""

    def __init__(
        self,
        logits_of: Callable[[torch.Tensor], torch.Tensor],
        class_names: Sequence[str],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
    ):
        if len(class_names) > 256:
            raise ValueError(f"seg_map is uint8: at most 256 classes, got {len(class_names)}")
        super().__init__(logits_of, class_names, (image_size, image_size), mean, std, device)
        self.image_size = image_size
        self.options = self.options + ("image_size",)
        self.prediction_types = self.prediction_types + ("max",)

    def prepare(self, image: np.ndarray, options: dict) -> ModelInput:
        height, width = image.shape[:2]
        size = longest_side_size(width, height, options.get("image_size", self.image_size))
        resized = np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))
        pixels = torch.from_numpy(resized.copy()).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        return ModelInput(tensor=self.normalise(pixels), image=image, region=(0.0, 0.0, float(width), float(height)))

    def _prediction(self, logits: torch.Tensor, model_input: ModelInput, options: dict) -> dict:
        """The semantic prediction plus `seg_map`: uint8 (h, w) class per pixel of the model input, and
        `image_size`: [w, h] of the model input (MAX's reply fields)."""
        prediction = super()._prediction(logits, model_input, options)
        seg_map = self.class_map(logits, options.get("threshold", 0.5))[0]
        prediction["seg_map"] = seg_map.to(torch.uint8).cpu()
        prediction["image_size"] = [int(seg_map.shape[1]), int(seg_map.shape[0])]
        return prediction
