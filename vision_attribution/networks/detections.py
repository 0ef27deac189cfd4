"""What an instance detector (tensormask, swin) hands the instance adapter: one image's detections."""
from dataclasses import dataclass

import torch


@dataclass
class Detections:
    """Detections of one image, highest score first.

    pred_boxes (N, 4) float32 XYXY in original-image pixels; scores (N,) float32; pred_classes (N,) int64;
    pred_masks (N, H0, W0) bool; locations (N, L): what the detector needs to recompute each detection's score
    at another input, in the detector's own layout (its module says which).
    """

    pred_boxes: torch.Tensor
    scores: torch.Tensor
    pred_classes: torch.Tensor
    pred_masks: torch.Tensor
    locations: torch.Tensor

    def __len__(self) -> int:
        return self.scores.shape[0]
