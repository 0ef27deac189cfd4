"""Framework configs the tests write next to their checkpoints: detectron2 YAML for tensormask, mmdet 3 Python for
swin, each small enough for a CPU test (used by unit and serving tests alike)."""
from vision_attribution.networks.swin import DEFAULT_CONFIG as SWIN_DEFAULT_CONFIG

# Base-TensorMask.yaml of detectron2's TensorMask project, the _BASE_ of its published configs.
BASE_TENSORMASK_YAML = """\
MODEL:
  META_ARCHITECTURE: "TensorMask"
  MASK_ON: True
  BACKBONE:
    NAME: "build_retinanet_resnet_fpn_backbone"
  RESNETS:
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
  ANCHOR_GENERATOR:
    SIZES: [[44, 60], [88, 120], [176, 240], [352, 480], [704, 960], [1408, 1920]]
    ASPECT_RATIOS: [[1.0]]
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    FUSE_TYPE: "avg"
  TENSOR_MASK:
    ALIGNED_ON: True
    BIPYRAMID_ON: True
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.02
  STEPS: (60000, 80000)
  MAX_ITER: 90000
VERSION: 2
"""

SMALL_TENSORMASK_YAML = '_BASE_: "Base-TensorMask.yaml"\nINPUT:\n  MIN_SIZE_TEST: 96\n  MAX_SIZE_TEST: 160\n'
"""A user's config on top of Base-TensorMask.yaml (written next to it): test images at 96..160 pixels."""

SMALL_SWIN_CONFIG = f"""_base_ = {str(SWIN_DEFAULT_CONFIG)!r}
model = dict(test_cfg=dict(rpn=dict(max_per_img=40), rcnn=dict(max_per_img=10)))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(192, 128), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""
"""A user's mmdet 3 config: the shipped one (`_base_`) with the test resolution lowered to 192x128 and fewer proposals
and detections, so that a CPU test stays fast; the architecture and key layout are the seed's."""
