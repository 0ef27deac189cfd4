"""TensorMask meta-architecture (detectron2 projects/TensorMask) for inference and attribution.

Inputs are BGR float images (3, H, W) with pixel values 0..255 at network resolution (the
size detectron2's ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST) produces, see
``network_input_size``); the model subtracts PIXEL_MEAN, divides by PIXEL_STD and pads
bottom/right with zeros to a multiple of 32.

A detection's location (`Detections.locations`, (N, 5) int64) is (level, y, x, anchor, class): the index of the
FPN level in MODEL.TENSOR_MASK.IN_FEATURES, the cell of that level's grid (network resolution), the anchor and
the class.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from ..detections import Detections
from .backbone import build_resnet_fpn_backbone
from .config import DEFAULT_CONFIG, check_supported
from .head import TensorMaskHead

__all__ = ["TensorMask", "network_input_size"]

_SCALE_CLAMP = math.log(1000.0 / 16)


def network_input_size(height: int, width: int, min_size: int = 800, max_size: int = 1333
                       ) -> Tuple[int, int]:
    """(H, W) that detectron2's test-time ResizeShortestEdge gives an image of (height, width)."""
    scale = min_size / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)



def _cell_anchors(sizes: Sequence[float], aspect_ratio: float) -> torch.Tensor:
    """(A, 4) XYXY anchors centred at 0, as DefaultAnchorGenerator.generate_cell_anchors."""
    anchors = []
    for size in sizes:
        w = math.sqrt(size * size / aspect_ratio)
        h = aspect_ratio * w
        anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def _apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: Sequence[float]
                  ) -> torch.Tensor:
    """Box2BoxTransform.apply_deltas: deltas (N, 4) (dx, dy, dw, dh), boxes (N, 4) -> (N, 4)."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=_SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3] / wh, max=_SCALE_CLAMP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack((pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h), dim=1)


def _paste_mask(mask: torch.Tensor, box: torch.Tensor, height: int, width: int,
                threshold: float = 0.5) -> Tuple[torch.Tensor, slice, slice]:
    """detectron2's paste_masks_in_image for one mask (M, M) of probabilities into ``box``.

    Returns the thresholded pasted region (h, w) bool and its (row, column) slices.
    """
    x0, y0, x1, y1 = box.tolist()
    col0, row0 = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
    col1, row1 = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
    rows = slice(row0, max(row0, row1))
    cols = slice(col0, max(col0, col1))
    if row1 <= row0 or col1 <= col0:
        return mask.new_zeros((0, 0), dtype=torch.bool), rows, cols
    grid_y = (torch.arange(row0, row1, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    grid_x = (torch.arange(col0, col1, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(grid_x[None, :], grid_y[:, None]), dim=2)
    pasted = F.grid_sample(mask[None, None].float(), grid[None].to(mask.device),
                           align_corners=False)
    return pasted[0, 0] >= threshold, rows, cols


class TensorMask(nn.Module):
    """TensorMask R-FPN. Parameter names: ``backbone.*`` and ``head.*`` as in detectron2."""

    def __init__(self, cfg: Optional[Dict] = None):
        super().__init__()
        cfg = DEFAULT_CONFIG if cfg is None else cfg
        check_supported(cfg)
        model_cfg = cfg["MODEL"]
        tm_cfg = model_cfg["TENSOR_MASK"]
        self.backbone = build_resnet_fpn_backbone(cfg)
        self.in_features = list(tm_cfg["IN_FEATURES"])
        self.strides = [self.backbone.strides[name] for name in self.in_features]
        num_levels = len(self.in_features)
        anchor_cfg = model_cfg["ANCHOR_GENERATOR"]
        sizes = anchor_cfg["SIZES"] * (num_levels if len(anchor_cfg["SIZES"]) == 1 else 1)
        ratios = anchor_cfg["ASPECT_RATIOS"] * (
            num_levels if len(anchor_cfg["ASPECT_RATIOS"]) == 1 else 1)
        self.cell_anchors = [_cell_anchors(s, r[0]) for s, r in zip(sizes, ratios)]
        mask_sizes = [int(size // self.strides[0]) for size in sizes[0]]

        self.num_classes = tm_cfg["NUM_CLASSES"]
        self.head = TensorMaskHead(
            in_channels=model_cfg["FPN"]["OUT_CHANNELS"], num_levels=num_levels,
            num_anchors=len(sizes[0]), mask_sizes=mask_sizes, num_classes=self.num_classes,
            num_convs=tm_cfg["NUM_CONVS"], cls_channels=tm_cfg["CLS_CHANNELS"],
            bbox_channels=tm_cfg["BBOX_CHANNELS"], mask_channels=tm_cfg["MASK_CHANNELS"],
            aligned_on=tm_cfg["ALIGNED_ON"], bipyramid_on=tm_cfg["BIPYRAMID_ON"],
        )
        self.score_threshold = tm_cfg["SCORE_THRESH_TEST"]
        self.topk_candidates = tm_cfg["TOPK_CANDIDATES_TEST"]
        self.nms_threshold = tm_cfg["NMS_THRESH_TEST"]
        self.bbox_reg_weights = tuple(tm_cfg["BBOX_REG_WEIGHTS"])
        self.detections_per_image = cfg["TEST"]["DETECTIONS_PER_IMAGE"]
        self.register_buffer("pixel_mean", torch.tensor(model_cfg["PIXEL_MEAN"]).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(model_cfg["PIXEL_STD"]).view(3, 1, 1),
                             persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Raw BGR (B, 3, H, W) -> normalised, zero-padded to multiples of 32 (B, 3, H', W')."""
        images = (images - self.pixel_mean) / self.pixel_std
        divisor = self.backbone.size_divisibility
        pad_h = -images.shape[-2] % divisor
        pad_w = -images.shape[-1] % divisor
        return F.pad(images, (0, pad_w, 0, pad_h))

    def level_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Raw BGR (B, 3, H, W) -> FPN features of IN_FEATURES, each (B, 256, Hi, Wi)."""
        features = self.backbone(self.preprocess(images))
        return [features[name] for name in self.in_features]

    def forward(self, images: torch.Tensor):
        """Dense head outputs for raw BGR images (B, 3, H, W); see TensorMaskHead.forward."""
        return self.head(self.level_features(images))

    def anchors_at(self, level: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                   anchor: torch.Tensor) -> torch.Tensor:
        """XYXY anchors (N, 4) at grid cells (ys, xs) of the given levels, all (N,) int64."""
        cell = torch.cat(self.cell_anchors).to(ys.device)
        anchors_per_level = self.cell_anchors[0].shape[0]
        stride = torch.tensor(self.strides, device=ys.device)[level]
        shift = torch.stack((xs, ys, xs, ys), dim=1) * stride[:, None]
        return cell[level * anchors_per_level + anchor] + shift.float()

    def _candidates(self, class_logits: List[torch.Tensor], threshold: float):
        """Scores (N,) above threshold, best first (at most TOPK_CANDIDATES_TEST), and their
        locations (N, 5) [level, y, x, anchor, class]; class_logits per level (1, A*K, Hi, Wi)."""
        scores, locations = [], []
        for level, logits in enumerate(class_logits):
            probs = logits[0].reshape(self.head.num_anchors, self.num_classes,
                                      *logits.shape[-2:]).permute(2, 3, 0, 1).sigmoid()
            hits = torch.nonzero(probs > threshold)  # (n, 4) [y, x, anchor, class]
            scores.append(probs[tuple(hits.t())])
            locations.append(torch.cat([hits.new_full((hits.shape[0], 1), level), hits], 1))
        scores, locations = torch.cat(scores), torch.cat(locations)
        order = torch.sort(scores, descending=True, stable=True).indices[: self.topk_candidates]
        return scores[order], locations[order]

    def _mask_probabilities(self, features: List[torch.Tensor], locations: torch.Tensor
                            ) -> List[torch.Tensor]:
        """Sigmoid mask (M, M) of each location (N, 5), M depending on level and anchor."""
        masks: List[Optional[torch.Tensor]] = [None] * locations.shape[0]
        needed_levels = sorted(set(locations[:, 0].tolist()))
        tower_levels = sorted(set(needed_levels) | ({0} if self.head.bipyramid_on else set()))
        tower = dict(zip(tower_levels, self.head.mask_tower([features[i] for i in tower_levels])))
        for level in needed_levels:
            level_feature = self.head.level_mask_feature(tower, level)
            for anchor in range(self.head.num_anchors):
                rows = torch.nonzero((locations[:, 0] == level) & (locations[:, 3] == anchor))[:, 0]
                if rows.numel() == 0:
                    continue
                logits = self.head.mask_logits_at(
                    level_feature, level, anchor, torch.zeros_like(rows),
                    locations[rows, 1], locations[rows, 2])
                for row, mask in zip(rows.tolist(), logits.sigmoid()):
                    masks[row] = mask
        return masks

    @torch.no_grad()
    def detect(self, image: torch.Tensor, original_size: Optional[Tuple[int, int]] = None,
               score_threshold: float = 0.5) -> Detections:
        """Detect instances in one raw BGR image (3, H, W) at network resolution.

        Keeps detections with score > max(score_threshold, SCORE_THRESH_TEST) after
        detectron2's top-k, class-wise NMS and DETECTIONS_PER_IMAGE; boxes and masks are
        scaled to original_size (H0, W0) (default: (H, W)).
        """
        height, width = image.shape[-2:]
        out_h, out_w = original_size if original_size is not None else (height, width)
        features = self.level_features(image[None].to(self.pixel_mean))
        threshold = max(score_threshold, self.score_threshold)
        scores, locations = self._candidates(self.head.class_logits(features), threshold)

        level, ys, xs, anchor, classes = locations.unbind(1)
        deltas = scores.new_zeros((len(scores), 4))
        for i in sorted(set(level.tolist())):
            at_level = level == i
            level_deltas = self.head.box_deltas([features[i]])[0][0]
            level_deltas = level_deltas.reshape(self.head.num_anchors, 4, *level_deltas.shape[-2:])
            deltas[at_level] = level_deltas[anchor[at_level], :, ys[at_level], xs[at_level]]
        anchors = self.anchors_at(level, ys, xs, anchor)
        boxes = _apply_deltas(deltas, anchors, self.bbox_reg_weights)
        keep = batched_nms(boxes, scores, classes, self.nms_threshold)[: self.detections_per_image]
        boxes, scores, locations, anchors = boxes[keep], scores[keep], locations[keep], anchors[keep]

        scale = boxes.new_tensor([out_w / width, out_h / height] * 2)
        boxes = boxes * scale
        anchors = anchors * scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h)
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, locations, anchors = (
            boxes[nonempty], scores[nonempty], locations[nonempty], anchors[nonempty])

        pred_masks = torch.zeros((len(scores), out_h, out_w), dtype=torch.bool)
        for i, (mask, anchor_box) in enumerate(
                zip(self._mask_probabilities(features, locations), anchors)):
            region, rows, cols = _paste_mask(mask, anchor_box, out_h, out_w)
            pred_masks[i, rows, cols] = region.cpu()
        return Detections(
            pred_boxes=boxes.float().cpu(), scores=scores.float().cpu(),
            pred_classes=locations[:, 4].cpu(), pred_masks=pred_masks, locations=locations.cpu())

    def instance_score(self, images: torch.Tensor, location: Sequence[int]) -> torch.Tensor:
        """Score (B,) of one fixed detection location [level, y, x, anchor, class] for raw BGR
        images (B, 3, H, W) of the network-resolution size the location was found at:
        sigmoid of that class logit, differentiable w.r.t. ``images``."""
        level, y, x, anchor, cls = (int(v) for v in location)
        feature = self.backbone(self.preprocess(images))[self.in_features[level]]
        logit = self.head.class_logit_at(feature, y, x, anchor * self.num_classes + cls)
        return logit.sigmoid()
