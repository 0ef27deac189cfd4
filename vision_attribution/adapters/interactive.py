"""Adapter for interactive segmenters prompted with extreme points (DEXTR): one object per request.

The request's four points select a crop of the image; the network sees the crop plus a heatmap of the points
(4 channels) and predicts the object's mask in the crop, which is pasted back into the image. An explanation
integrates the object's mask logits summed over the region predicted on the real input, over all four input
channels, and reports how much of the attribution falls on the heatmap channel versus the image channels.
"""
import uuid
from typing import Callable

import numpy as np
import torch
from skimage.measure import find_contours

from .base import ExplanationPlan, ModelInput
from .fixed_size import RGB_ROWS
from ..formats.encode import encode_png
from ..attribution.engine import PathTarget
from ..formats.errors import RequestError
from ..formats.dextr import interactive_segment_reply, opex_document
from ..attribution.baselines import ValueScale
from ..networks.dextr import INPUT_MEAN, INPUT_STD, CropSettings, network_input, paste_probability

IMAGE_CHANNELS, HEATMAP_CHANNEL = slice(0, 3), 3
POINT_MARGIN = 0.1
"""Points may lie outside the image by at most this fraction of its larger side (clicks just past an edge)."""


def mask_contours(probability: np.ndarray, threshold: float) -> list[list[list[int]]]:
    """The seed's contours: skimage find_contours(probability, threshold, fully_connected="high"), each point as
    integer [x, y] (truncated); polygons with fewer than 3 distinct points are dropped. An image with a side of one
    pixel has no contour (find_contours needs 2 x 2; the mask itself is still in the reply)."""
    if min(probability.shape) < 2:
        return []
    polygons = []
    for contour in find_contours(probability, threshold, fully_connected="high"):
        polygon = [[int(x), int(y)] for y, x in contour]
        if len({tuple(point) for point in polygon}) >= 3:
            polygons.append(polygon)
    return polygons


def check_points(points: list[list[float]], height: int, width: int) -> None:
    """400 for points far outside the image (farther than POINT_MARGIN of its larger side) and for points on one
    horizontal or vertical line (their crop would have no area)."""
    margin = POINT_MARGIN * max(height, width)
    outside = [point for point in points if not (-margin <= point[0] <= width + margin and -margin <= point[1] <= height + margin)]
    if outside:
        raise RequestError(f"option 'points' has points far outside the {width}x{height} image: {outside}; points are [x, y] pixels of the image")
    for axis, name in ((0, "x"), (1, "y")):
        if len({point[axis] for point in points}) == 1:
            raise RequestError(f"option 'points' all have {name} = {points[0][axis]:g}: the four extreme points must span an area around the object")


class ExtremePointsSegmenterAdapter:
    """Serves `logits_of(x)`: (B, 4, h, w) normalised crop + heatmap -> (B, 1, h, w) mask logits (sigmoid = probability)."""

    seed_layout = RGB_ROWS
    seed_explanation_keys = None
    options = ("points", "label", "threshold")
    prediction_types = ("json", "png", "opex", "gzip", "npz")
    value_scale = ValueScale(INPUT_MEAN, INPUT_STD)  # RGB in [0, 1] and the points heatmap in [0, 1]

    def __init__(self, logits_of: Callable[[torch.Tensor], torch.Tensor], crop: CropSettings, device: torch.device):
        self.logits_of = logits_of
        self.crop = crop
        self.device = device

    def prepare(self, image: np.ndarray, options: dict) -> ModelInput:
        """Crop around the points: (1, 4, h, w) input; region = the crop box (left, top, right, bottom) in the image."""
        points = options.get("points")
        if points is None:
            raise RequestError("this model needs 'points': the object's four extreme points as [[x, y], [x, y], [x, y], [x, y]]")
        height, width = image.shape[:2]
        check_points(points, height, width)
        tensor, box_yx = network_input(image, np.asarray(points), self.crop)
        (top, left), (bottom, right) = box_yx.tolist()
        return ModelInput(tensor=tensor.to(self.device), image=image, region=(left, top, right, bottom))

    def mean_input(self, model_input: ModelInput) -> torch.Tensor:
        """Zero in the normalised space: the mean colour and the mean heatmap."""
        return torch.zeros_like(model_input.tensor)

    @torch.no_grad()
    def predict(self, inputs: list[ModelInput], options: list[dict]) -> list[dict]:
        """All crops have the network's size, so a batch is one forward pass."""
        probabilities = torch.sigmoid(self.logits_of(torch.cat([item.tensor for item in inputs]))[:, 0].float()).cpu().numpy()
        return [self._prediction(probability, item, opts) for probability, item, opts in zip(probabilities, inputs, options)]

    def _prediction(self, crop_probability: np.ndarray, model_input: ModelInput, options: dict) -> dict:
        """The object at the image's resolution: probability (H, W) float32 (multiples of 1/255, as the seed
        quantises it), pred_masks (1, H, W) = probability >= threshold, and the prompt."""
        left, top, right, bottom = model_input.region
        box_yx = np.array([[top, left], [bottom, right]], dtype=np.float32)
        probability = paste_probability(crop_probability, box_yx, model_input.image.shape[:2]).astype(np.float32) / 255.0
        threshold = options.get("threshold", 0.5)
        return {
            "probability": torch.from_numpy(probability),
            "pred_masks": torch.from_numpy(probability >= threshold)[None],
            "label": options.get("label", 1),
            "threshold": threshold,
            "points": torch.tensor(options["points"], dtype=torch.float64),
            "crop_box": torch.tensor(model_input.region, dtype=torch.float64),
        }

    def prediction_png(self, prediction: dict) -> np.ndarray:
        """(H, W) uint8: the label where the object is, 0 elsewhere."""
        return prediction["pred_masks"][0].numpy().astype(np.uint8) * np.uint8(prediction["label"])

    def prediction_document(self, prediction: dict, reply_type: str) -> dict:
        """json: the seed's reply (mask PNG in base64, contours, meta); opex: OPEX; gzip/npz: the tensors."""
        if reply_type not in ("json", "opex"):
            return prediction
        contours = mask_contours(prediction["probability"].numpy(), prediction["threshold"])
        points, label = prediction["points"].tolist(), prediction["label"]
        if reply_type == "json":
            return interactive_segment_reply(encode_png(self.prediction_png(prediction)), contours, points, label)
        meta = {"segmenter": "dextr", "points": points, "label": label, "threshold": prediction["threshold"]}
        return opex_document(contours, label, uuid.uuid4().hex, meta)

    def plan_explanation(self, model_input: ModelInput, options: dict) -> ExplanationPlan:
        with torch.no_grad():
            logits = self.logits_of(model_input.tensor)[:, 0].float()
        probability = torch.sigmoid(logits)
        threshold = options.get("threshold", 0.5)
        region = probability[0] >= threshold
        pixels = int(region.sum())
        if pixels == 0:
            raise RequestError(f"the predicted mask is empty at threshold {threshold} (highest probability {float(probability.max()):.3f}); lower 'threshold' to explain it", status=422)
        weights = region.to(model_input.tensor.dtype)

        def object_logits(logits: torch.Tensor) -> torch.Tensor:
            return (logits[:, 0] * weights).sum(dim=(1, 2))

        groups, labels = region[None], ["object"]
        if not region.all():
            groups, labels = torch.stack([region, ~region]), ["object", "background"]
        return ExplanationPlan(
            path_target=PathTarget(self.logits_of, object_logits),
            target={"kind": "region", "index": 0, "name": "object", "reduction": "sum", "pixels": pixels},
            prediction=self._prediction(probability[0].cpu().numpy(), model_input, options),
            groups=groups,
            group_labels=labels,
            integral_summary=channel_attribution,
        )


def channel_attribution(attribution: torch.Tensor) -> dict:
    """How the attribution divides between the image (RGB) channels and the point heatmap channel: the signed
    sums of IG and the shares of sum |IG| (the two shares add up to 1)."""
    ig = attribution[0].double()
    sums = {"image": float(ig[IMAGE_CHANNELS].sum()), "heatmap": float(ig[HEATMAP_CHANNEL].sum())}
    magnitude = {"image": float(ig[IMAGE_CHANNELS].abs().sum()), "heatmap": float(ig[HEATMAP_CHANNEL].abs().sum())}
    total = sum(magnitude.values())
    shares = {name: (value / total if total > 0 else 0.0) for name, value in magnitude.items()}
    return {"channel_attribution": {"sum": sums, "share": shares}}
