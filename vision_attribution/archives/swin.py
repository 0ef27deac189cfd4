"""swin: Cascade Mask R-CNN Swin-T on COCO (seed swin-segmentation-server), served through mmdet 3.3.

mmdet and mmcv are imported only when an archive is staged or a worker starts (networks/swin/detector.py).
"""
import json
from pathlib import Path

import torch

from ..adapters.instance import InstanceSegmenterAdapter
from ..formats.class_names import COCO_CLASSES
from ..formats.decode import PixelLayout
from ..networks.swin import DEFAULT_CONFIG, read_swin_checkpoint
from . import StageInputs, read_weights

SUMMARY = "Cascade Mask R-CNN Swin-T through mmdet 3.3, COCO (80 classes); your checkpoint: the seed fork's (mmdet 2.11) .pth, or mmdet 3's"
CHECKPOINT = "required"
FRAMEWORK_CONFIG = f"an mmdet 3 config .py (default: {DEFAULT_CONFIG.name}, shipped with the archive)"
MODEL_SETTINGS: dict = {}
REQUIRES = ("mmdet.apis", "mmcv.ops")  # not in the serving core: ./setup.sh --all installs them
SEED_LAYOUT = PixelLayout(axes="HWC", order="BGR")  # the seed's img_data: a BGR image as (H, W, 3) lists
CONFIG_FILE = "swin_config.py"  # the mmdet config, flattened (its _base_ chain resolved)
CLASS_NAMES_FILE = "class_names.json"


def stage(inputs: StageInputs) -> list[Path]:
    """Weights: the fork's {'meta', 'state_dict'} checkpoint (converted to mmdet 3's names) or an mmdet 3 one, read
    with weights_only=True unless --trust-checkpoint; config: --config (an mmdet 3 .py) or the archive's default.
    Class names: the checkpoint's meta, else COCO's."""
    from ..networks.swin.detector import load_cascade, read_config

    cfg = read_config(inputs.framework_config or DEFAULT_CONFIG)
    state_dict, class_names = read_swin_checkpoint(inputs.checkpoint, inputs.trust_checkpoint)
    detector = load_cascade(cfg, state_dict, torch.device("cpu"))
    if class_names is None:
        class_names = list(COCO_CLASSES)
    if len(class_names) != detector.num_classes:
        raise ValueError(f"the checkpoint names {len(class_names)} classes, the config's model has {detector.num_classes}")
    torch.save(detector.model.state_dict(), inputs.weights_path)
    config_path, names_path = inputs.workdir / CONFIG_FILE, inputs.workdir / CLASS_NAMES_FILE
    cfg.dump(str(config_path))
    names_path.write_text(json.dumps(class_names))
    return [config_path, names_path]


def load_adapter(model_dir: Path, model_settings: dict, device: torch.device) -> InstanceSegmenterAdapter:
    from ..networks.swin.detector import load_cascade, read_config

    detector = load_cascade(read_config(Path(model_dir) / CONFIG_FILE), read_weights(model_dir), device)
    class_names = json.loads((Path(model_dir) / CLASS_NAMES_FILE).read_text())
    return InstanceSegmenterAdapter(detector, class_names, detector.network_size, SEED_LAYOUT, device, bgr=True, rescale=detector.rescale)
