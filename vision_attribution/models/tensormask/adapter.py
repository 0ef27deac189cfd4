"""The tensormask archive: a detectron2 TensorMask checkpoint served through the instance adapter."""
from pathlib import Path

import torch

from ...decode import PixelLayout
from ..instance import InstanceSegmenterAdapter
from .checkpoint import load_tensormask
from .config import COCO_CLASSES, read_tensormask_config
from .model import network_input_size

SEED_LAYOUT = PixelLayout(axes="CHW", order="BGR")  # the seed's img_data: a BGR image as (3, H, W) lists


def load_adapter(model_dir: Path, config: dict, device: torch.device) -> InstanceSegmenterAdapter:
    """model_dir holds checkpoint.pkl or checkpoint.pth and, optionally, tensormask_config.yaml
    (a flattened detectron2 config); `allow_unsafe_pickle` in the model config opts into full unpickling."""
    model_dir = Path(model_dir)
    checkpoint = next(path for path in (model_dir / "checkpoint.pkl", model_dir / "checkpoint.pth") if path.exists())
    config_file = model_dir / "tensormask_config.yaml"
    cfg = read_tensormask_config(str(config_file) if config_file.exists() else None)
    model = load_tensormask(str(checkpoint), cfg, allow_unsafe_pickle=bool(config.get("allow_unsafe_pickle", False))).to(device)
    min_size, max_size = cfg["INPUT"]["MIN_SIZE_TEST"], cfg["INPUT"]["MAX_SIZE_TEST"]

    def resize(height: int, width: int) -> tuple[int, int]:
        return network_input_size(height, width, min_size, max_size)

    return InstanceSegmenterAdapter(model, COCO_CLASSES, resize, SEED_LAYOUT, device, bgr=cfg["INPUT"]["FORMAT"] == "BGR")


def write_flat_config(detectron2_yaml: str, out: str) -> None:
    """Resolve a detectron2 YAML (with its _BASE_ chain) into one self-contained file for the archive."""
    import yaml

    Path(out).write_text(yaml.safe_dump(read_tensormask_config(detectron2_yaml)))


if __name__ == "__main__":
    import sys

    write_flat_config(sys.argv[1], sys.argv[2])
