"""bit: BiT-S-R101x3 fine-tuned on CIFAR-10 (seed int-gradients-image-server, -bp), seed-compatible."""
from pathlib import Path

import torch

from ..formats import values
from ..adapters.classifier import ClassifierAdapter
from ..formats.class_names import CIFAR10_CLASSES
from ..networks.bit import load_bit, read_bit_state_dict
from ..serving.settings import Setting
from . import WEIGHTS_FILE, StageInputs

SUMMARY = "BiT ResNetV2 (the seed's BiT-S-R101x3) on CIFAR-10; your bit_pytorch checkpoint"
CHECKPOINT = "required"
FRAMEWORK_CONFIG = None
MODEL_SETTINGS = {"idg_grid": Setting(values.integer(1, 32), 4, "IDG groups: an N x N grid of patches over the input")}
INPUT_SIZE = (32, 32)
MEAN = STD = (0.5, 0.5, 0.5)


def stage(inputs: StageInputs) -> list[Path]:
    """Weights: a bit_pytorch state dict, bare or under "model" (train.py's bit.pth.tar), "model_state_dict" or "state_dict"."""
    model = load_bit(read_bit_state_dict(inputs.checkpoint, trust=inputs.trust_checkpoint))
    torch.save(model.state_dict(), inputs.weights_path)
    return []


def load_adapter(model_dir: Path, model_settings: dict, device: torch.device) -> ClassifierAdapter:
    model = load_bit(Path(model_dir) / WEIGHTS_FILE).to(device)
    return ClassifierAdapter(model, CIFAR10_CLASSES, INPUT_SIZE, MEAN, STD, device, idg_grid=model_settings["idg_grid"])
