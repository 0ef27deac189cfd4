"""lanet: LaNet (DARTS-style NetworkCIFAR) on CIFAR-10 (seed int-gradients-image-server, -lb), seed-compatible."""
from pathlib import Path

import torch

from ..formats import values
from ..adapters.classifier import ClassifierAdapter
from ..formats.class_names import CIFAR10_CLASSES
from ..networks.lanet import load_lanet, read_lanet_state_dict
from ..serving.settings import Setting
from . import WEIGHTS_FILE, StageInputs

SUMMARY = "LaNet NetworkCIFAR(C=128, layers=24) on CIFAR-10; your checkpoint ({'model_state_dict': ...}, e.g. top1.pt)"
CHECKPOINT = "required"
FRAMEWORK_CONFIG = None
MODEL_SETTINGS = {"idg_grid": Setting(values.integer(1, 32), 4, "IDG groups: an N x N grid of patches over the input")}
INPUT_SIZE = (32, 32)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def stage(inputs: StageInputs) -> list[Path]:
    """Weights: {'model_state_dict': ...} as the LaNet training script saves it, or a bare state dict."""
    model = load_lanet(read_lanet_state_dict(inputs.checkpoint, trust=inputs.trust_checkpoint))
    torch.save(model.state_dict(), inputs.weights_path)
    return []


def load_adapter(model_dir: Path, model_settings: dict, device: torch.device) -> ClassifierAdapter:
    """The logits (not the auxiliary head's) are served and explained."""
    model = load_lanet(Path(model_dir) / WEIGHTS_FILE).to(device)

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        return model(images)[0]

    return ClassifierAdapter(logits_of, CIFAR10_CLASSES, INPUT_SIZE, MEAN, STD, device, idg_grid=model_settings["idg_grid"])
