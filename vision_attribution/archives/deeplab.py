"""deeplab: DeepLabV3 PASCAL VOC semantic segmentation (seed MAX Image Segmenter), mobile or full."""
import logging
from pathlib import Path

import torch

from ..formats import values
from ..adapters.longest_side import DEFAULT_IMAGE_SIZE, MAX_IMAGE_SIZES, LongestSideSegmenterAdapter
from ..formats.class_names import VOC_CLASSES
from ..serving.settings import Setting
from . import WEIGHTS_FILE, StageInputs

log = logging.getLogger(__name__)

SUMMARY = "DeepLabV3 on PASCAL VOC (MAX Image Segmenter), mobile or full; your torchvision COCO_WITH_VOC_LABELS_V1 weights"
CHECKPOINT = "required"
FRAMEWORK_CONFIG = None


def image_size_setting(value) -> int:
    """MAX's IMAGE_SIZE: an integer 16..1024; anything else falls back to 513 with a logged warning, as MAX did."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.isdigit():
        text = int(text)
    if isinstance(text, bool) or not isinstance(text, int):
        log.warning("image_size %r is not a positive integer; using the default image size of %d", value, DEFAULT_IMAGE_SIZE)
        return DEFAULT_IMAGE_SIZE
    low, high = MAX_IMAGE_SIZES
    if not low <= text <= high:
        log.warning("image_size %d is not in range %d to %d; using the default image size of %d", text, low, high, DEFAULT_IMAGE_SIZE)
        return DEFAULT_IMAGE_SIZE
    return text


MODEL_SETTINGS = {
    "model_type": Setting(values.choice("mobile", "full"), "mobile", "mobile: deeplabv3_mobilenet_v3_large; full: deeplabv3_resnet101 (MAX's MODEL_TYPE)"),
    "image_size": Setting(image_size_setting, DEFAULT_IMAGE_SIZE, "longest side of the model input, 16..1024 (MAX's IMAGE_SIZE)"),
}


def stage(inputs: StageInputs) -> list[Path]:
    """Weights: torchvision's state dict of the chosen model type (its published files include the auxiliary
    classifier, which is checked and dropped)."""
    from ..networks.deeplab import load_deeplab, served_state_dict

    model = load_deeplab(inputs.checkpoint, inputs.model_settings["model_type"], inputs.trust_checkpoint)
    torch.save(served_state_dict(model), inputs.weights_path)
    return []


def load_adapter(model_dir: Path, model_settings: dict, device: torch.device) -> LongestSideSegmenterAdapter:
    from ..networks.deeplab import MEAN, STD, load_deeplab

    model = load_deeplab(Path(model_dir) / WEIGHTS_FILE, model_settings["model_type"]).to(device)
    return LongestSideSegmenterAdapter(model, VOC_CLASSES, model_settings["image_size"], MEAN, STD, device)
