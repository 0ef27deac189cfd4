"""DeepLabV3 for PASCAL VOC (21 classes): torchvision's deeplabv3_mobilenet_v3_large ("mobile") and
deeplabv3_resnet101 ("full"), read from torchvision's state-dict layout (its COCO_WITH_VOC_LABELS_V1 files).

The published files hold the auxiliary classifier too (`aux_classifier.*`), which only training uses: a
checkpoint is loaded strictly into the architecture with or without it, and the served model drops it.
"""
import os
from typing import Mapping

import torch
from torch import nn
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, deeplabv3_resnet101

from .checkpoints import load_strictly, read_state_dict

VOC_CLASS_COUNT = 21
MODEL_TYPES = {"mobile": deeplabv3_mobilenet_v3_large, "full": deeplabv3_resnet101}
"""MAX Image Segmenter's MODEL_TYPE -> the torchvision constructor with the same 21 VOC classes."""
TORCHVISION_NAMES = {"mobile": "deeplabv3_mobilenet_v3_large", "full": "deeplabv3_resnet101"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
AUX_PREFIX = "aux_classifier."
_FIRST_KEYS = {"mobile": "backbone.0.0.weight", "full": "backbone.conv1.weight"}  # each backbone's stem convolution


class DeepLabLogits(nn.Module):
    """A torchvision DeepLabV3 without its auxiliary head: (B, 3, h, w) normalised RGB -> (B, 21, h, w) logits
    at the input's resolution (torchvision upsamples the classifier's output bilinearly)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)["out"]


def build_deeplab(model_type: str, aux_classifier: bool) -> nn.Module:
    """The torchvision architecture on the meta device (no weights, nothing downloaded)."""
    with torch.device("meta"):
        return MODEL_TYPES[model_type](weights=None, weights_backbone=None, num_classes=VOC_CLASS_COUNT, aux_loss=aux_classifier)


def model_type_of(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """"mobile" or "full" from the backbone's keys; None when the keys are neither's."""
    return next((model_type for model_type, key in _FIRST_KEYS.items() if key in state_dict), None)


def load_deeplab(source: str | os.PathLike | Mapping[str, torch.Tensor], model_type: str, trust: bool = False) -> DeepLabLogits:
    """A checkpoint (path or state dict; bare as torchvision publishes it, or under "model"/"state_dict")
    loaded strictly into `model_type`, with the auxiliary classifier where the checkpoint has one, which is
    then dropped. Eval mode, frozen. ValueError naming the problem (and the right --model-type) otherwise."""
    description = f"DeepLabV3 {model_type} ({TORCHVISION_NAMES[model_type]})"
    state_dict = read_state_dict(source, ("model", "state_dict"), description, trust)
    found = model_type_of(state_dict)
    if found is not None and found != model_type:
        raise ValueError(f"this is a {TORCHVISION_NAMES[found]} checkpoint, not {TORCHVISION_NAMES[model_type]}: use --model-type {found}")
    with_aux = any(key.startswith(AUX_PREFIX) for key in state_dict)
    network = load_strictly(build_deeplab(model_type, with_aux), state_dict, description)
    network.aux_classifier = None
    return DeepLabLogits(network).eval()


def served_state_dict(model: DeepLabLogits) -> dict[str, torch.Tensor]:
    """The weights an archive ships: torchvision's layout without the auxiliary classifier."""
    return model.network.state_dict()
