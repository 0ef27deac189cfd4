"""Adapter for semantic segmenters: per-class regions, region targets, IDG per predicted segment.

The explained scalar for class c is the sum (or mean) of class c's logits over the region the real input
predicts for c; the region stays fixed along the path.
"""
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attribution.engine import PathTarget
from .base import ExplanationPlan, ModelInput
from ..formats.errors import RequestError
from .fixed_size import FixedSizeInput, class_by_name_or_index


class SemanticSegmenterAdapter(FixedSizeInput):
    """Serves `logits_of(x)`: (B, 3, h, w) normalised input -> (B, K, h, w) class logits; class 0 is background.

    binary: the model has one foreground class whose region is probability >= threshold (option).
    """

    seed_explanation_keys = None
    prediction_types = ("gzip", "npz", "png", "json")

    def __init__(
        self,
        logits_of: Callable[[torch.Tensor], torch.Tensor],
        class_names: Sequence[str],
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        binary: bool = False,
    ):
        super().__init__(input_size, mean, std, device)
        self.logits_of = logits_of
        self.class_names = list(class_names)
        self.binary = binary
        self.options = ("target", "region_reduction") + (
            ("threshold",) if binary else ()
        )

    def class_map(self, logits: torch.Tensor, threshold: float) -> torch.Tensor:
        """(B, K, h, w) logits -> (B, h, w) int64 class per pixel."""
        if self.binary:
            return (logits.softmax(dim=1)[:, 1] >= threshold).long()
        return logits.argmax(dim=1)

    @torch.no_grad()
    def predict(self, inputs: list[ModelInput], options: list[dict]) -> list[dict]:
        """One forward pass per group of equally sized inputs (sizes differ where the aspect ratio is kept)."""
        groups: dict[tuple, list[int]] = {}
        for position, item in enumerate(inputs):
            groups.setdefault(tuple(item.tensor.shape), []).append(position)
        predictions: list = [None] * len(inputs)
        for positions in groups.values():
            logits = self.logits_of(torch.cat([inputs[position].tensor for position in positions])).float()
            for row, position in zip(logits, positions):
                predictions[position] = self._prediction(row[None], inputs[position], options[position])
        return predictions

    def _prediction(self, logits: torch.Tensor, model_input: ModelInput, options: dict) -> dict:
        """Masks at the original resolution for every foreground class present, largest first."""
        height, width = model_input.image.shape[:2]
        full = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        classes = self.class_map(full, options.get("threshold", 0.5))[0]
        probabilities = full.softmax(dim=1)[0]
        present = [c for c in classes.unique().tolist() if c != 0]
        present.sort(key=lambda c: -int((classes == c).sum()))
        masks = torch.stack([classes == c for c in present]) if present else torch.zeros((0, height, width), dtype=torch.bool)
        return {
            "pred_masks": masks.cpu(),
            "pred_classes": torch.tensor(present, dtype=torch.int64),
            "labels": [self.class_names[c] for c in present],
            "scores": torch.tensor([float(probabilities[c][classes == c].mean()) for c in present], dtype=torch.float32),
            "class_names": self.class_names,
        }

    def prediction_png(self, prediction: dict) -> np.ndarray:
        """(H, W) uint8 image whose pixel values are class indices (0 = background)."""
        masks, classes = prediction["pred_masks"], prediction["pred_classes"]
        label_image = np.zeros(masks.shape[1:], dtype=np.uint8)
        for mask, label in zip(masks.numpy()[::-1], classes.tolist()[::-1]):
            label_image[mask] = label
        return label_image

    def target_class(self, target, classes: torch.Tensor) -> int:
        """A class name or index; None -> the foreground class with the largest region (background if none)."""
        if target is None:
            counts = torch.bincount(classes.flatten(), minlength=len(self.class_names))
            foreground = counts[1:]
            return int(foreground.argmax()) + 1 if foreground.sum() > 0 else 0
        return class_by_name_or_index(target, self.class_names)

    def plan_explanation(self, model_input: ModelInput, options: dict) -> ExplanationPlan:
        with torch.no_grad():
            logits = self.logits_of(model_input.tensor).float()
        classes = self.class_map(logits, options.get("threshold", 0.5))[0]
        target = self.target_class(options.get("target"), classes)
        region = classes == target
        pixels = int(region.sum())
        if pixels == 0:
            raise RequestError(f"class {self.class_names[target]!r} is not predicted anywhere in this image; explain a predicted class")
        reduction = options.get("region_reduction", "sum")
        weights = region.to(model_input.tensor.dtype) / (pixels if reduction == "mean" else 1)

        def region_logits(logits: torch.Tensor) -> torch.Tensor:
            return (logits[:, target] * weights).sum(dim=(1, 2))

        present = classes.unique().tolist()
        return ExplanationPlan(
            path_target=PathTarget(self.logits_of, region_logits),
            target={"kind": "region", "index": target, "name": self.class_names[target], "reduction": reduction, "pixels": pixels},
            prediction=self._prediction(logits, model_input, options),
            groups=torch.stack([classes == c for c in present]),
            group_labels=[self.class_names[c] for c in present],
        )
