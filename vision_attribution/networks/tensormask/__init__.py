"""TensorMask R-FPN (detectron2 projects/TensorMask) in plain PyTorch, CPU or GPU."""
from .checkpoint import (
    CheckpointError,
    CheckpointReport,
    UnsafePickleError,
    load_tensormask,
    load_tensormask_weights,
)
from .config import COCO_CLASSES, DEFAULT_CONFIG, read_tensormask_config
from .model import TensorMask, network_input_size
from .swap_align2nat import swap_align2nat, swap_align2nat_at_locations

__all__ = [
    "COCO_CLASSES",
    "CheckpointError",
    "CheckpointReport",
    "DEFAULT_CONFIG",
    "TensorMask",
    "UnsafePickleError",
    "load_tensormask",
    "load_tensormask_weights",
    "network_input_size",
    "read_tensormask_config",
    "swap_align2nat",
    "swap_align2nat_at_locations",
]
