"""Cascade Mask R-CNN with a Swin-T backbone through mmdet 3.3 (the swin archive).

checkpoint.py converts the seed fork's (mmdet 2.11) checkpoints and needs no mmdet; detector.py holds the
project's only mmdet/mmcv imports. DEFAULT_CONFIG is the archive's mmdet 3 config.
"""
from pathlib import Path

from .checkpoint import fork_to_mmdet3, merging_columns_to_mmdet3, read_swin_checkpoint

DEFAULT_CONFIG = Path(__file__).with_name("cascade-mask-rcnn_swin-t-p4-w7_fpn_4conv1fc-giou_coco.py")

__all__ = ["DEFAULT_CONFIG", "fork_to_mmdet3", "merging_columns_to_mmdet3", "read_swin_checkpoint"]
