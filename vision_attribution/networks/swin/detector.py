"""Cascade Mask R-CNN through mmdet 3.3 (the project's only mmdet/mmcv imports): detection as mmdet's
inference_detector does it, and one detection's class score with its RoI chain fixed, differentiable w.r.t. pixels.

Images are raw BGR float pixels (B, 3, h, w), 0..255, already resized by the config's test-time Resize
(`network_size`, `rescale`); mmdet's own data_preprocessor converts to RGB, normalises and pads to 32.

A detection's location (`Detections.locations`, (N, 4 S + 1) float32) is its RoI chain: the box each of the
cascade's S = 3 stages scored, (x1, y1, x2, y2) at network resolution (stage 1: the RPN proposal; stage s + 1:
stage s's box regressed for its top class), then the class.
Its score is softmax(mean over the stages of the stage's class logits)[class], as mmdet's CascadeRoIHead scores it.
"""
from pathlib import Path
from typing import Sequence

import mmcv
import numpy as np
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData
from mmdet.models.layers import multiclass_nms
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import bbox2roi
from mmdet.utils import get_test_pipeline_cfg

from ..checkpoints import load_strictly
from ..detections import Detections

LOAD_STEPS = ("LoadImageFromFile", "LoadImageFromNDArray", "LoadAnnotations")
"""Test-pipeline steps that only read the image or annotations; serving gets the decoded image instead."""


class ConfigError(ValueError):
    """An mmdet config this archive cannot serve; the message says why."""


def _step_type(step) -> str:
    return str(step.get("type", "")).split(".")[-1]


def read_config(path: str | Path) -> Config:
    """Load an mmdet 3 config (a Python file: mmengine executes it) and check that this archive can serve it:
    a CascadeRoIHead with a mask head, and a test pipeline of loading, one Resize and PackDetInputs."""
    try:
        cfg = Config.fromfile(str(path))
    except Exception as error:  # noqa: BLE001 - mmengine raises anything a Python file can
        raise ConfigError(f"the mmdet config {Path(path).name} cannot be read: {type(error).__name__}: {error}") from error
    model = cfg.get("model")
    if not model or model.get("type") != "CascadeRCNN" or model.get("roi_head", {}).get("type") != "CascadeRoIHead" or "mask_head" not in model.roi_head:
        raise ConfigError("the swin archive serves a Cascade Mask R-CNN: the config's model must be a CascadeRCNN with a CascadeRoIHead that has a mask_head")
    if model.get("data_preprocessor", {}).get("type") not in ("DetDataPreprocessor", "mmdet.DetDataPreprocessor"):
        raise ConfigError("the config's model.data_preprocessor must be a DetDataPreprocessor")
    test_cfg = model.get("test_cfg", {})
    if not test_cfg.get("rcnn") or not test_cfg.get("rpn"):
        raise ConfigError("the config's model.test_cfg needs its rpn and rcnn settings (score_thr, nms, max_per_img, mask_thr_binary)")
    try:
        steps = get_test_pipeline_cfg(cfg)
    except (RuntimeError, AttributeError, KeyError) as error:
        raise ConfigError(f"the config has no test pipeline (test_dataloader.dataset.pipeline): {error}") from error
    kinds = [_step_type(step) for step in steps]
    other = [kind for kind in kinds if kind not in (*LOAD_STEPS, "Resize", "PackDetInputs")]
    resizes = [step for step in steps if _step_type(step) == "Resize"]
    if other or len(resizes) != 1 or "scale" not in resizes[0]:
        raise ConfigError(
            f"the config's test pipeline is {kinds}; the swin archive serves pipelines that load the image, "
            "Resize it once with a 'scale' (keep_ratio true or false) and pack it (PackDetInputs)"
        )
    return cfg



class CascadeMaskRCNN:
    """An mmdet 3 Cascade Mask R-CNN (built by `load_cascade`) and its config, exposing what the instance
    adapter needs (adapters.instance.InstanceDetector)."""

    def __init__(self, model: torch.nn.Module, cfg: Config):
        self.model = model
        self.cfg = cfg
        resize = next(step for step in get_test_pipeline_cfg(cfg) if _step_type(step) == "Resize")
        scale = resize["scale"]
        self.resize_scale = (scale, scale) if isinstance(scale, int) else tuple(scale)  # (w, h), as mmcv's Resize
        self.keep_ratio = bool(resize.get("keep_ratio", False))
        self.interpolation = resize.get("interpolation", "bilinear")
        self.resize_backend = resize.get("backend", "cv2")
        preprocessor = cfg.model.data_preprocessor
        mean = torch.tensor(preprocessor.get("mean") or [0.0, 0.0, 0.0], dtype=torch.float32)
        # pixel_mean in the input's BGR order: the image that normalises to zero
        self.pixel_mean = (mean.flip(0) if preprocessor.get("bgr_to_rgb", False) else mean).view(3, 1, 1)
        self.num_classes = model.roi_head.bbox_head[-1].num_classes

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the config's test-time Resize gives an image of (height, width), as mmcv computes it."""
        if not self.keep_ratio:
            return self.resize_scale[1], self.resize_scale[0]
        new_width, new_height = mmcv.rescale_size((width, height), self.resize_scale)
        return new_height, new_width

    def rescale(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8 with mmcv's resize (the config's interpolation and backend)."""
        return mmcv.imresize(image, (size[1], size[0]), interpolation=self.interpolation, backend=self.resize_backend)

    def _features(self, images: torch.Tensor, original_size: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], list[DetDataSample]]:
        """(B, 3, h, w) raw BGR -> FPN features, and the data samples with mmdet's image metainfo."""
        height, width = images.shape[-2:]
        metainfo = {
            "img_shape": (height, width),
            "ori_shape": tuple(original_size),
            "scale_factor": (width / original_size[1], height / original_size[0]),  # (w, h), as mmcv's Resize sets it
        }
        samples = [DetDataSample(metainfo=metainfo) for _ in range(images.shape[0])]
        data = self.model.data_preprocessor({"inputs": images, "data_samples": samples}, False)
        return self.model.extract_feat(data["inputs"]), data["data_samples"]

    def detect(self, image: torch.Tensor, original_size: Sequence[int], score_threshold: float) -> Detections:
        """(3, h, w) raw BGR at network resolution -> detections scoring above `score_threshold` (and the config's
        score_thr), computed as mmdet's CascadeRCNN.predict computes them, with each detection's RoI chain."""
        features, samples = self._features(image[None], original_size)
        metainfo = samples[0].metainfo
        roi_head = self.model.roi_head
        proposals = self.model.rpn_head.predict(features, samples, rescale=False)[0].bboxes
        rois = bbox2roi([proposals])
        stage_boxes, stage_logits = [], []
        for stage in range(roi_head.num_stages):
            scored = roi_head._bbox_forward(stage, features, rois)
            stage_boxes.append(rois[:, 1:])
            stage_logits.append(scored["cls_score"])
            if stage < roi_head.num_stages - 1:
                top_class = scored["cls_score"][:, :-1].argmax(dim=1)
                regressed = roi_head.bbox_head[stage].regress_by_class(rois[:, 1:], top_class, scored["bbox_pred"], metainfo)
                rois = torch.cat([rois[:, :1], regressed], dim=1)
        logits = sum(stage_logits) / float(len(stage_logits))
        # the last stage's boxes per class and the softmax scores, without NMS (mmdet's "aug test" output) ...
        raw = roi_head.bbox_head[-1].predict_by_feat(rois=(rois,), cls_scores=(logits,), bbox_preds=(scored["bbox_pred"],),
                                                     batch_img_metas=[metainfo], rcnn_test_cfg=None, rescale=False)[0]
        # ... then mmdet's multiclass NMS, keeping which (RoI, class) pair each detection is
        rcnn = roi_head.test_cfg
        kept, classes, pair = multiclass_nms(raw.bboxes, raw.scores, rcnn.score_thr, rcnn.nms, rcnn.max_per_img, return_inds=True)
        above = kept[:, -1] > score_threshold
        kept, classes, roi_index = kept[above], classes[above], pair[above] // self.num_classes
        results = InstanceData(bboxes=kept[:, :4], scores=kept[:, 4], labels=classes)
        results = roi_head.predict_mask(features, [metainfo], [results], rescale=True)[0]  # boxes -> original pixels
        chain = torch.cat([boxes[roi_index] for boxes in stage_boxes] + [classes[:, None].float()], dim=1)
        return Detections(
            pred_boxes=results.bboxes.float().cpu(),
            scores=results.scores.float().cpu(),
            pred_classes=results.labels.long().cpu(),
            pred_masks=results.masks.bool().cpu(),
            locations=chain.float().cpu(),
        )

    def instance_score(self, images: torch.Tensor, location: Sequence[float]) -> torch.Tensor:
        """(B, 3, h, w) raw BGR -> (B,) the class score of the detection whose RoI chain is `location` (4 S + 1 values),
        through backbone, neck, RoIAlign and every stage's box head."""
        roi_head = self.model.roi_head
        chain = torch.as_tensor(location[:-1], dtype=torch.float32, device=images.device).view(roi_head.num_stages, 4)
        klass = int(location[-1])
        batch = images.shape[0]
        features, _ = self._features(images, images.shape[-2:])
        image_index = torch.arange(batch, dtype=torch.float32, device=images.device)[:, None]
        stage_logits = [
            roi_head._bbox_forward(stage, features, torch.cat([image_index, chain[stage].expand(batch, 4)], dim=1))["cls_score"]
            for stage in range(roi_head.num_stages)
        ]
        logits = sum(stage_logits) / float(len(stage_logits))
        return F.softmax(logits, dim=-1)[:, klass]


def build_model(cfg: Config) -> torch.nn.Module:
    """The config's detector with untrained weights, on the CPU, in eval mode."""
    init_default_scope(cfg.get("default_scope", "mmdet"))
    return MODELS.build(cfg.model).eval()


def load_cascade(cfg: Config, state_dict: dict[str, torch.Tensor], device: torch.device) -> CascadeMaskRCNN:
    """The config's detector with `state_dict` (mmdet 3 names) loaded strictly: every missing, unexpected or
    mis-shaped key is a ValueError naming it."""
    model = load_strictly(build_model(cfg), state_dict, "Swin Cascade Mask R-CNN")
    return CascadeMaskRCNN(model.to(device), cfg)

