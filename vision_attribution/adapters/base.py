"""What a model adapter gives the service: prepared inputs, predictions, and what to explain."""
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from ..formats.decode import PixelLayout
from ..attribution.baselines import ValueScale
from ..attribution.engine import PathTarget


@dataclass
class ModelInput:
    """One image prepared for the model.

    tensor: (1, C, h, w) in the model's normalised input space, on the model's device.
    image: the decoded original, (H, W, 3) uint8 RGB.
    region: (left, top, right, bottom) of the original image that the model input covers.
    """

    tensor: torch.Tensor
    image: np.ndarray
    region: tuple[float, float, float, float]


@dataclass
class ExplanationPlan:
    """What to integrate for one request, decided on the real input.

    path_target: the explained scalar, path points (b, C, h, w) -> (b,), as a model forward shared by every
        request of the archive (so that explanations can share chunks) and this request's readout.
    target: description of the explained scalar ({"kind", "index", "name", ...}).
    prediction: the model's outputs at the input, merged into the reply (e.g. {"output": logits (1, K)}).
    groups: boolean masks (M, h, w) over the model input for IDG, with one label each.
    groups_are_segments: the groups are predicted segments (the IDG hierarchy's middle level), not a patch grid.
    integral_summary: further reply fields computed from the attribution (1, C, h, w) (e.g. its share per input channel).
    """

    path_target: PathTarget
    target: dict[str, Any]
    prediction: dict[str, Any] = field(default_factory=dict)
    groups: Optional[torch.Tensor] = None
    group_labels: list[str] = field(default_factory=list)
    groups_are_segments: bool = True
    integral_summary: Optional[Callable[[torch.Tensor], dict[str, Any]]] = None


class ModelAdapter(Protocol):
    """The model-specific part of a served archive; everything else is shared."""

    seed_layout: PixelLayout  # layout of the seed's "img_data"
    seed_explanation_keys: Optional[tuple[str, ...]]  # exact keys of the seed's explanation reply, if it had one
    options: tuple[str, ...]  # the model's own request options (the path options every archive accepts are the service's)
    prediction_types: tuple[str, ...]  # reply encodings for predictions, default first
    device: torch.device
    value_scale: ValueScale  # image values in [0, 1] -> the model's input space: how the other baselines are made

    def prepare(self, image: np.ndarray, options: dict) -> ModelInput: ...

    def predict(self, inputs: list[ModelInput], options: list[dict]) -> list[dict]: ...

    def plan_explanation(self, model_input: ModelInput, options: dict) -> ExplanationPlan: ...

    def mean_input(self, model_input: ModelInput) -> torch.Tensor:
        """(1, C, h, w): the input that normalises to zero (the training mean image), the zeros/mean baseline."""

    def prediction_png(self, prediction: dict) -> np.ndarray:
        """(H, W) uint8 label image of a prediction; only needed when "png" is in prediction_types."""

    # Optional: `prediction_document(prediction, reply_type) -> dict`, the document to encode for a reply type
    # (gzip, npz, json, opex) where it differs from the prediction itself.
