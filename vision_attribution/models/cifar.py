"""The seed classifiers on CIFAR-10: BiT-S-R101x3 and LaNet, with the seeds' preprocessing."""
from pathlib import Path

import torch

from .classifier import ClassifierAdapter

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
INPUT_SIZE = (32, 32)
BIT_MEAN = BIT_STD = (0.5, 0.5, 0.5)
LANET_MEAN = (0.4914, 0.4822, 0.4465)
LANET_STD = (0.2470, 0.2435, 0.2616)


def load_bit_adapter(model_dir: Path, config: dict, device: torch.device) -> ClassifierAdapter:
    """The bit archive: checkpoint.pth in bit_pytorch layout (optionally `module.`-prefixed)."""
    from .bit import load_bit

    model = load_bit(Path(model_dir) / "checkpoint.pth").to(device)
    return ClassifierAdapter(model, CIFAR10_CLASSES, INPUT_SIZE, BIT_MEAN, BIT_STD, device, idg_grid=config.get("idg_grid", 4))


def load_lanet_adapter(model_dir: Path, config: dict, device: torch.device) -> ClassifierAdapter:
    """The lanet archive: checkpoint.pth holding {'model_state_dict': ...}; the logits (not aux) are explained."""
    from .lanet import load_lanet

    model = load_lanet(Path(model_dir) / "checkpoint.pth").to(device)

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        return model(images)[0]

    return ClassifierAdapter(logits_of, CIFAR10_CLASSES, INPUT_SIZE, LANET_MEAN, LANET_STD, device, idg_grid=config.get("idg_grid", 4))
