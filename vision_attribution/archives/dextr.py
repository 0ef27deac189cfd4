"""dextr: Deep Extreme Cut (seed DEXTR), the ResNet-101 U-Net: four extreme points of an object in, its mask out."""
import json
from pathlib import Path

import torch

from ..adapters.interactive import ExtremePointsSegmenterAdapter
from ..networks.dextr import CropSettings, load_network, read_checkpoint
from . import StageInputs, read_weights

SUMMARY = "DEXTR ResNet-101 U-Net (extreme points -> mask); your checkpoint: a pickled DextrModel (--trust-checkpoint), a state dict, or dextr-train's"
CHECKPOINT = "required"
FRAMEWORK_CONFIG = None
MODEL_SETTINGS: dict = {}
CROP_FILE = "dextr_crop.json"  # {"size": [h, w], "padding", "blob_sigma"}: the crop the network was trained with


def stage(inputs: StageInputs) -> list[Path]:
    """Weights and crop settings from any DEXTR checkpoint (networks.dextr.read_checkpoint): a whole pickled DextrModel
    only with --trust-checkpoint (its size, padding and sigma are kept), else a plain state dict."""
    checkpoint = read_checkpoint(inputs.checkpoint, trust=inputs.trust_checkpoint)
    network = load_network(checkpoint.state_dict)
    torch.save(network.state_dict(), inputs.weights_path)
    crop_path = inputs.workdir / CROP_FILE
    crop_path.write_text(json.dumps(checkpoint.crop.as_dict()))
    return [crop_path]


def load_adapter(model_dir: Path, model_settings: dict, device: torch.device) -> ExtremePointsSegmenterAdapter:
    crop = CropSettings.from_dict(json.loads((Path(model_dir) / CROP_FILE).read_text()))
    network = load_network(read_weights(model_dir)).to(device)

    def logits_of(inputs: torch.Tensor) -> torch.Tensor:
        return network(inputs)["out"]

    return ExtremePointsSegmenterAdapter(logits_of, crop, device)
