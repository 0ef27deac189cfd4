"""TensorMask head with detectron2's parameter names.

Parameters: ``cls_subnet.{0,2,4,6}``, ``cls_score``, ``bbox_subnet.{0,2,4,6}``, ``bbox_pred``,
``mask_subnet.{0,2,4,6}``, ``mask_pred_{MM}`` (one 1x1 conv per anchor mask size, e.g.
``mask_pred_11`` and ``mask_pred_15``) and, with the bipyramid, ``mask_fuse.0``.
Channel layout of the outputs is detectron2's: class logits (B, A*K, H, W) with channel
a*K + k; box deltas (B, A*4, H, W) with channel a*4 + j.
"""
import math
from typing import List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .swap_align2nat import swap_align2nat, swap_align2nat_at_locations

__all__ = ["TensorMaskHead"]


def _tower(in_channels: int, channels: int, num_convs: int) -> nn.Sequential:
    layers = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(in_channels, channels, 3, 1, 1), nn.ReLU()]
        in_channels = channels
    return nn.Sequential(*layers)


class TensorMaskHead(nn.Module):
    def __init__(self, in_channels: int, num_levels: int, num_anchors: int, mask_sizes: List[int],
                 num_classes: int, num_convs: int, cls_channels: int, bbox_channels: int,
                 mask_channels: int, aligned_on: bool, bipyramid_on: bool):
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.mask_sizes = list(mask_sizes)
        self.aligned_on = aligned_on
        self.bipyramid_on = bipyramid_on
        # A class logit depends on a (2r+1)^2 window of its level's feature map.
        self.cls_receptive_radius = num_convs + 1

        self.cls_subnet = _tower(in_channels, cls_channels, num_convs)
        self.cls_score = nn.Conv2d(cls_channels, num_anchors * num_classes, 3, 1, 1)
        self.bbox_subnet = _tower(in_channels, bbox_channels, num_convs)
        self.bbox_pred = nn.Conv2d(bbox_channels, num_anchors * 4, 3, 1, 1)
        self.mask_subnet = _tower(in_channels, mask_channels, num_convs)
        for mask_size in self.mask_sizes:
            self.add_module(f"mask_pred_{mask_size:02d}",
                            nn.Conv2d(mask_channels, mask_size * mask_size, 1))
        if aligned_on and bipyramid_on:
            self.mask_fuse = nn.Sequential(
                nn.Conv2d(mask_channels, mask_channels, 3, 1, 1), nn.ReLU()
            )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - 0.01) / 0.01))

    def level_lambda(self, level: int) -> int:
        """Unit-length ratio of SwapAlign2Nat at a level: 2**level with the bipyramid, else 1."""
        return 2 ** level if self.bipyramid_on else 1

    def class_logits(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per level (B, C, Hi, Wi) -> (B, A*K, Hi, Wi)."""
        return [self.cls_score(self.cls_subnet(x)) for x in features]

    def box_deltas(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per level (B, C, Hi, Wi) -> (B, A*4, Hi, Wi)."""
        return [self.bbox_pred(self.bbox_subnet(x)) for x in features]

    def class_logit_at(self, feature: torch.Tensor, y: int, x: int, channel: int) -> torch.Tensor:
        """Class logit (B,) at one position of a level's feature map (B, C, H, W).

        Runs the class tower on the receptive-field window only: equal to
        ``class_logits([feature])[0][:, channel, y, x]``.
        """
        radius = self.cls_receptive_radius
        height, width = feature.shape[-2:]
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"location ({y}, {x}) outside the {height}x{width} feature map")
        y0, x0 = max(0, y - radius), max(0, x - radius)
        window = feature[:, :, y0:min(height, y + radius + 1), x0:min(width, x + radius + 1)]
        return self.cls_score(self.cls_subnet(window))[:, channel, y - y0, x - x0]

    def mask_tower(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per level (B, C, Hi, Wi) -> (B, mask_channels, Hi, Wi)."""
        return [self.mask_subnet(x) for x in features]

    def level_mask_feature(self, mask_features: Mapping[int, torch.Tensor], level: int
                           ) -> torch.Tensor:
        """Feature the mask predictors of a level read, from the mask tower outputs indexed by
        level (a list, or a dict holding the levels needed): with the bipyramid, the level's tower
        output upsampled by 2**level to the finest level, added to it and fused
        (B, mask_channels, H0, W0); otherwise the level's tower output itself."""
        if not self.bipyramid_on:
            return mask_features[level]
        high_res = mask_features[0]
        height, width = high_res.shape[-2:]
        upsampled = mask_features[level]
        if level > 0:
            upsampled = F.interpolate(upsampled, scale_factor=2.0 ** level, mode="bilinear",
                                      align_corners=False)
        return self.mask_fuse(upsampled[:, :, :height, :width] + high_res)

    def mask_logits(self, level_feature: torch.Tensor, level: int, anchor: int) -> torch.Tensor:
        """Dense mask logits of one (level, anchor): (B, M*M, Hi, Wi) with
        M = mask_sizes[anchor] * level_lambda(level)."""
        logits = getattr(self, f"mask_pred_{self.mask_sizes[anchor]:02d}")(level_feature)
        if self.aligned_on:
            logits = swap_align2nat(logits, self.level_lambda(level))
        return logits

    def mask_logits_at(self, level_feature: torch.Tensor, level: int, anchor: int,
                       batch_index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor
                       ) -> torch.Tensor:
        """Mask logits (K, M, M) at K positions (ys, xs) of the level's grid; equal to
        ``mask_logits(...)[batch_index, :, ys, xs]`` reshaped."""
        logits = getattr(self, f"mask_pred_{self.mask_sizes[anchor]:02d}")(level_feature)
        if self.aligned_on:
            return swap_align2nat_at_locations(logits, self.level_lambda(level), batch_index,
                                               ys, xs)
        side = self.mask_sizes[anchor]
        return logits[batch_index, :, ys, xs].reshape(-1, side, side)

    def forward(self, features: List[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[List[torch.Tensor]]]:
        """Dense outputs in detectron2's layout: class logits and box deltas per level, and
        per level a list over anchors of mask logits (B, M*M, Hi, Wi)."""
        mask_features = self.mask_tower(features)
        pred_masks = []
        for level in range(len(features)):
            level_feature = self.level_mask_feature(mask_features, level)
            pred_masks.append([self.mask_logits(level_feature, level, anchor)
                               for anchor in range(len(self.mask_sizes))])
        return self.class_logits(features), self.box_deltas(features), pred_masks
