"""tensormask: detectron2's TensorMask R50-FPN on COCO (seed tensormask-segmentation-server), in plain PyTorch."""
from pathlib import Path

import torch
import yaml

from ..adapters.instance import InstanceSegmenterAdapter
from ..formats.class_names import COCO_CLASSES
from ..formats.decode import PixelLayout
from ..networks.checkpoints import load_strictly
from ..networks.tensormask import TensorMask, load_tensormask, network_input_size, read_tensormask_config
from . import StageInputs, read_weights

SUMMARY = "TensorMask R50-FPN, COCO (80 classes); your detectron2 checkpoint (.pkl or .pth, e.g. model_final.pth)"
CHECKPOINT = "required"
FRAMEWORK_CONFIG = "a detectron2 YAML config (default: the values of tensormask_R_50_FPN_6x.yaml)"
MODEL_SETTINGS: dict = {}
SEED_LAYOUT = PixelLayout(axes="CHW", order="BGR")  # the seed's img_data: a BGR image as (3, H, W) lists
CONFIG_FILE = "tensormask_config.yaml"  # the detectron2 config, flattened (its _BASE_ chain resolved)


def stage(inputs: StageInputs) -> list[Path]:
    """Weights: a detectron2 checkpoint (model-zoo pickle or torch.save file); config: --config, a detectron2
    YAML (default: the published tensormask_R_50_FPN_6x.yaml values)."""
    cfg = read_tensormask_config(str(inputs.framework_config) if inputs.framework_config else None)
    model = load_tensormask(str(inputs.checkpoint), cfg, allow_unsafe_pickle=inputs.trust_checkpoint)
    torch.save(model.state_dict(), inputs.weights_path)
    config_path = inputs.workdir / CONFIG_FILE
    config_path.write_text(yaml.safe_dump(cfg))
    return [config_path]


def load_adapter(model_dir: Path, model_settings: dict, device: torch.device) -> InstanceSegmenterAdapter:
    cfg = read_tensormask_config(str(Path(model_dir) / CONFIG_FILE))
    model = load_strictly(TensorMask(cfg), read_weights(model_dir), "TensorMask").to(device)
    min_size, max_size = cfg["INPUT"]["MIN_SIZE_TEST"], cfg["INPUT"]["MAX_SIZE_TEST"]

    def resize(height: int, width: int) -> tuple[int, int]:
        return network_input_size(height, width, min_size, max_size)

    return InstanceSegmenterAdapter(model, COCO_CLASSES, resize, SEED_LAYOUT, device, bgr=cfg["INPUT"]["FORMAT"] == "BGR")
