"""TensorMask configuration: the detectron2 config values the model and its inference use.

``read_tensormask_config(None)`` returns the published ``tensormask_R_50_FPN_6x.yaml`` values.
``read_tensormask_config(path)`` starts from detectron2's library defaults (defaults.py plus
TensorMask's add_tensormask_config) and merges a detectron2 YAML file, following its
``_BASE_`` chain (paths relative to the file that names them), exactly as detectron2's
``merge_from_file`` would for these keys. Keys outside the schema below are ignored.
"""
import ast
import copy
import os
from typing import Any, Dict, Optional

import yaml

from ...formats.class_names import COCO_CLASSES

__all__ = ["COCO_CLASSES", "DETECTRON2_DEFAULTS", "DEFAULT_CONFIG", "read_tensormask_config",
           "check_supported"]

DETECTRON2_DEFAULTS: Dict[str, Any] = {
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "MASK_ON": False,
        "PIXEL_MEAN": [103.530, 116.280, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone"},
        "RESNETS": {
            "DEPTH": 50,
            "OUT_FEATURES": ["res4"],
            "NUM_GROUPS": 1,
            "NORM": "FrozenBN",
            "WIDTH_PER_GROUP": 64,
            "STRIDE_IN_1X1": True,
            "RES5_DILATION": 1,
            "RES2_OUT_CHANNELS": 256,
            "STEM_OUT_CHANNELS": 64,
            "DEFORM_ON_PER_STAGE": [False, False, False, False],
        },
        "FPN": {"IN_FEATURES": [], "OUT_CHANNELS": 256, "NORM": "", "FUSE_TYPE": "sum"},
        "ANCHOR_GENERATOR": {
            "NAME": "DefaultAnchorGenerator",
            "SIZES": [[32, 64, 128, 256, 512]],
            "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
            "OFFSET": 0.0,
        },
        "TENSOR_MASK": {
            "IN_FEATURES": ["p2", "p3", "p4", "p5", "p6", "p7"],
            "NUM_CONVS": 4,
            "NUM_CLASSES": 80,
            "CLS_CHANNELS": 256,
            "SCORE_THRESH_TEST": 0.05,
            "TOPK_CANDIDATES_TEST": 6000,
            "NMS_THRESH_TEST": 0.5,
            "BBOX_CHANNELS": 128,
            "BBOX_REG_WEIGHTS": [1.5, 1.5, 0.75, 0.75],
            "MASK_CHANNELS": 128,
            "ALIGNED_ON": False,
            "BIPYRAMID_ON": False,
        },
    },
    "INPUT": {"MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333, "FORMAT": "BGR"},
    "TEST": {"DETECTIONS_PER_IMAGE": 100},
}

# Base-TensorMask.yaml + tensormask_R_50_FPN_6x.yaml, restricted to the schema.
_PUBLISHED_6X_VALUES = {
    "MODEL": {
        "META_ARCHITECTURE": "TensorMask",
        "MASK_ON": True,
        "BACKBONE": {"NAME": "build_retinanet_resnet_fpn_backbone"},
        "RESNETS": {"OUT_FEATURES": ["res2", "res3", "res4", "res5"], "DEPTH": 50},
        "ANCHOR_GENERATOR": {
            "SIZES": [[44, 60], [88, 120], [176, 240], [352, 480], [704, 960], [1408, 1920]],
            "ASPECT_RATIOS": [[1.0]],
        },
        "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"], "FUSE_TYPE": "avg"},
        "TENSOR_MASK": {"ALIGNED_ON": True, "BIPYRAMID_ON": True},
    },
}


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> None:
    """Recursively merge ``update`` into ``base`` in place, keeping only keys of ``base``."""
    for key, value in update.items():
        if key not in base:
            continue
        if isinstance(base[key], dict):
            if isinstance(value, dict):
                _merge(base[key], value)
            continue
        if isinstance(value, str) and not isinstance(base[key], str):
            # detectron2 decodes strings such as "(1.5, 1.5, 0.75, 0.75)" as Python literals
            value = ast.literal_eval(value)
        if isinstance(value, tuple):
            value = list(value)
        base[key] = value


DEFAULT_CONFIG: Dict[str, Any] = copy.deepcopy(DETECTRON2_DEFAULTS)
_merge(DEFAULT_CONFIG, _PUBLISHED_6X_VALUES)


def _load_yaml_chain(path: str, seen=()) -> list:
    """[root-most base dict, ..., dict of ``path``] following ``_BASE_``."""
    path = os.path.abspath(path)
    if path in seen:
        raise ValueError(f"circular _BASE_ chain at {path}")
    with open(path, "r", encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a detectron2 YAML config (top level is not a mapping)")
    base = data.pop("_BASE_", None)
    if base is None:
        return [data]
    base_path = os.path.expanduser(base)
    if not os.path.isabs(base_path):
        base_path = os.path.join(os.path.dirname(path), base_path)
    return _load_yaml_chain(base_path, seen + (path,)) + [data]


def check_supported(cfg: Dict[str, Any]) -> None:
    """Raise ValueError for settings this implementation does not build."""
    model = cfg["MODEL"]
    problems = []
    if model["META_ARCHITECTURE"] != "TensorMask":
        problems.append(f"META_ARCHITECTURE {model['META_ARCHITECTURE']!r} (need 'TensorMask')")
    if model["BACKBONE"]["NAME"] != "build_retinanet_resnet_fpn_backbone":
        problems.append(f"BACKBONE.NAME {model['BACKBONE']['NAME']!r}")
    if not model["MASK_ON"]:
        problems.append("MASK_ON False")
    resnets = model["RESNETS"]
    if resnets["DEPTH"] not in (50, 101, 152):
        problems.append(f"RESNETS.DEPTH {resnets['DEPTH']}")
    if resnets["NORM"] != "FrozenBN":
        problems.append(f"RESNETS.NORM {resnets['NORM']!r}")
    if resnets["RES5_DILATION"] != 1:
        problems.append(f"RESNETS.RES5_DILATION {resnets['RES5_DILATION']}")
    if any(resnets["DEFORM_ON_PER_STAGE"]):
        problems.append("deformable convolutions")
    if model["FPN"]["NORM"] != "":
        problems.append(f"FPN.NORM {model['FPN']['NORM']!r}")
    if model["FPN"]["IN_FEATURES"] != ["res2", "res3", "res4", "res5"]:
        problems.append(f"FPN.IN_FEATURES {model['FPN']['IN_FEATURES']}")
    tensor_mask = model["TENSOR_MASK"]
    if tensor_mask["BIPYRAMID_ON"] and not tensor_mask["ALIGNED_ON"]:
        problems.append("BIPYRAMID_ON without ALIGNED_ON (detectron2 cannot build it either)")
    levels = len(tensor_mask["IN_FEATURES"])
    anchors = model["ANCHOR_GENERATOR"]
    if len(anchors["SIZES"]) not in (1, levels) or len(anchors["ASPECT_RATIOS"]) not in (1, levels):
        problems.append("ANCHOR_GENERATOR.SIZES/ASPECT_RATIOS do not match the levels")
    if len({len(sizes) for sizes in anchors["SIZES"]}) != 1:
        problems.append("different anchor counts per level")
    if any(len(ratios) != 1 for ratios in anchors["ASPECT_RATIOS"]):
        problems.append("more than one anchor aspect ratio (TensorMask has one mask size per size)")
    if problems:
        raise ValueError("unsupported TensorMask config: " + "; ".join(problems))


def read_tensormask_config(path: Optional[str] = None) -> Dict[str, Any]:
    """Nested dict of the values that matter (same layout as DEFAULT_CONFIG)."""
    if path is None:
        cfg = copy.deepcopy(DEFAULT_CONFIG)
    else:
        cfg = copy.deepcopy(DETECTRON2_DEFAULTS)
        for layer in _load_yaml_chain(path):
            _merge(cfg, layer)
    check_supported(cfg)
    return cfg
