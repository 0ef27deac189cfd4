"""Adapter for instance segmenters: detections with masks, instance-score targets, IDG per instance mask.

The explained scalar for instance i is its class score with the detection fixed from the real input
(TensorMask: the same location, anchor and class; a cascade R-CNN: the same chain of RoIs and class), recomputed
at every path point.
"""
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import ExplanationPlan, ModelInput
from ..attribution.baselines import ValueScale
from ..formats.decode import PixelLayout
from ..attribution.engine import PathTarget
from ..formats.errors import RequestError


class InstanceDetector(Protocol):
    """What the adapter needs of a detector working on raw (B, 3, h, w) images in its channel order."""

    pixel_mean: torch.Tensor  # (3, 1, 1): the image that normalises to zero

    def detect(self, image: torch.Tensor, original_size: tuple[int, int], score_threshold: float):
        """(3, h, w) -> detections, highest score first, with pred_boxes (N, 4), scores (N,), pred_classes (N,),
        pred_masks (N, H0, W0), locations (N, L): what instance_score needs to recompute each detection's score."""

    def instance_score(self, images: torch.Tensor, location: Sequence[float]) -> torch.Tensor:
        """(B, 3, h, w) -> (B,) score of the detection at `location` (a row of detect's locations, as a list)."""


def pillow_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 resized to size = (h, w) with Pillow's bilinear filter."""
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


class InstanceSegmenterAdapter:
    """Serves an InstanceDetector; `resize(h0, w0) -> (h, w)` gives the network resolution of an image and
    `rescale(image, (h, w))` resizes its pixels there (the detector's own test-time resize; Pillow bilinear by default)."""

    seed_explanation_keys = None
    prediction_types = ("gzip", "npz", "png", "json")
    options = ("threshold", "instance", "native_resolution")
    value_scale = ValueScale((0.0, 0.0, 0.0), (1 / 255,) * 3)  # the detector reads raw 0..255 pixels

    def __init__(
        self,
        detector: InstanceDetector,
        class_names: Sequence[str],
        resize: Callable[[int, int], tuple[int, int]],
        seed_layout: PixelLayout,
        device: torch.device,
        bgr: bool = True,
        rescale: Callable[[np.ndarray, tuple[int, int]], np.ndarray] = pillow_bilinear,
    ):
        self.detector = detector
        self.class_names = list(class_names)
        self.resize = resize
        self.rescale = rescale
        self.seed_layout = seed_layout
        self.device = device
        self.bgr = bgr

    def prepare(self, image: np.ndarray, options: dict) -> ModelInput:
        """(H, W, 3) RGB uint8 -> raw (1, 3, h, w) float pixels in the detector's channel order."""
        height, width = image.shape[:2]
        network_image = image
        if not options.get("native_resolution", False):
            size = self.resize(height, width)
            if min(size) < 1:
                raise RequestError(f"a {width}x{height} image cannot be resized for this model; send a less elongated image")
            network_image = self.rescale(image, size)
        pixels = torch.from_numpy(np.array(network_image[..., ::-1] if self.bgr else network_image)).to(self.device)
        return ModelInput(tensor=pixels.permute(2, 0, 1)[None].float(), image=image, region=(0.0, 0.0, float(width), float(height)))

    def _detect(self, model_input: ModelInput, options: dict):
        """Detections on the network-resolution input, boxes and masks at the original image's size."""
        with torch.no_grad():
            return self.detector.detect(model_input.tensor[0], original_size=model_input.image.shape[:2], score_threshold=options.get("threshold", 0.5))

    def _prediction(self, detections) -> dict:
        return {
            "pred_masks": detections.pred_masks.cpu(),
            "scores": detections.scores.cpu(),
            "pred_classes": detections.pred_classes.cpu(),
            "pred_boxes": detections.pred_boxes.cpu(),
            "labels": [self.class_names[c] for c in detections.pred_classes.tolist()],
        }

    def predict(self, inputs: list[ModelInput], options: list[dict]) -> list[dict]:
        """Images of different sizes are detected one by one (never stacked)."""
        return [self._prediction(self._detect(item, opts)) for item, opts in zip(inputs, options)]

    def prediction_png(self, prediction: dict) -> np.ndarray:
        """(H, W) uint8 instance image: 0 = no instance, i + 1 = the i-th detection (highest score wins)."""
        masks = prediction["pred_masks"].numpy()
        if len(masks) > 255:
            raise RequestError(f"{len(masks)} instances do not fit an 8-bit PNG; raise 'threshold' or ask for application/gzip")
        image = np.zeros(masks.shape[1:], dtype=np.uint8)
        for index in range(len(masks) - 1, -1, -1):
            image[masks[index]] = index + 1
        return image

    def plan_explanation(self, model_input: ModelInput, options: dict) -> ExplanationPlan:
        detections = self._detect(model_input, options)
        if len(detections) == 0:
            raise RequestError(f"no instance was detected with a score above {options.get('threshold', 0.5)}; lower 'threshold' to explain weaker detections", status=422)
        index = options.get("instance", 0)
        if index >= len(detections):
            raise RequestError(f"'instance' {index} does not exist: {len(detections)} instances were detected (0..{len(detections) - 1}, highest score first)")
        location = detections.locations[index].tolist()

        def instance_score(points: torch.Tensor) -> torch.Tensor:
            return self.detector.instance_score(points, location)

        height, width = model_input.tensor.shape[-2:]
        masks = F.interpolate(detections.pred_masks[:, None].float(), size=(height, width), mode="nearest")[:, 0].bool().to(self.device)
        labels = [f"{i}: {self.class_names[c]} {s:.2f}" for i, (c, s) in enumerate(zip(detections.pred_classes.tolist(), detections.scores.tolist()))]
        rest = ~masks.any(dim=0)
        if rest.any():
            masks, labels = torch.cat([masks, rest[None]]), labels + ["background"]
        klass = int(detections.pred_classes[index])
        return ExplanationPlan(
            path_target=PathTarget.of(instance_score),
            target={"kind": "instance", "index": klass, "name": self.class_names[klass], "instance": index, "score": float(detections.scores[index]), "location": location},
            prediction=self._prediction(detections),
            groups=masks,
            group_labels=labels,
        )

    def mean_input(self, model_input: ModelInput) -> torch.Tensor:
        """Zero after the detector's normalisation: its pixel mean image."""
        return self.detector.pixel_mean.to(model_input.tensor).expand_as(model_input.tensor[0])[None].clone()
