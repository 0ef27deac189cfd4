"""Checkpoints written the way the seeds' users have them: their file layouts, their file names, random values."""
import pickle
from pathlib import Path

import numpy as np
import torch

from vision_attribution.networks.bit import ResNetV2
from vision_attribution.networks.lanet import LANET_NET_ENCODING, NetworkCIFAR, decode_lanet_encoding
from vision_attribution.networks.tensormask import TensorMask


def small_lanet() -> NetworkCIFAR:
    """LaNet's architecture at C=16, 8 layers (the seed's is C=128, 24 layers), with the auxiliary head."""
    torch.manual_seed(0)
    return NetworkCIFAR(16, 10, 8, True, decode_lanet_encoding(LANET_NET_ENCODING))


def write_lanet_checkpoint(path: Path) -> Path:
    """As LaNet's training script saves top1.pt: {'epoch', 'model_state_dict', 'optimizer_state_dict'}."""
    model = small_lanet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9)
    torch.save({"epoch": 600, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)
    return path


def small_bit() -> ResNetV2:
    """BiT ResNetV2 R26x1 (the seed's is R101x3: same key layout, more units and width)."""
    torch.manual_seed(0)
    return ResNetV2((2, 2, 2, 2), 1, 10)


def write_bit_checkpoint(path: Path) -> Path:
    """As bit_pytorch's train.py saves bit.pth.tar: {'step', 'model': DataParallel state dict, 'optim'}."""
    model = small_bit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"step": 500, "model": state, "optim": optimizer.state_dict()}, path)
    return path


def random_tensormask() -> TensorMask:
    """TensorMask R50-FPN with random weights whose scores straddle 0.5, so that thresholds matter."""
    torch.manual_seed(0)
    model = TensorMask()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls_score.bias, mean=0.0, std=0.2)
    return model


def write_tensormask_checkpoint(path: Path, model_zoo_pickle: bool = False) -> Path:
    """detectron2's formats: a trained model_final.pth ({'model', 'iteration'} via torch.save) or a model-zoo
    pickle ({'model': numpy arrays, '__author__'})."""
    state = random_tensormask().state_dict()
    if model_zoo_pickle:
        with open(path, "wb") as stream:
            pickle.dump({"model": {key: value.numpy() for key, value in state.items()}, "__author__": "Detectron2 Model Zoo"}, stream)
    else:
        torch.save({"model": state, "iteration": 269999}, path)
    return path


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3) uint16), written by hand: Pillow writes 16-bit grey only."""
    import struct
    import zlib

    height, width = array.shape[:2]
    color_type = 0 if array.ndim == 2 else 2
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# The seed's Swin weights: Cascade Mask R-CNN Swin-T from Swin-Transformer-Object-Detection (mmdet 2.11), key names
# as that fork's modules define them (backbones/swin_transformer.py, mmdet 2.11's FPN, RPNHead, ConvFCBBoxHead with
# SyncBN, FCNMaskHead; a single mask_head dict is built once per cascade stage).
SWIN_T = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7}


def fork_relative_position_index(window: int) -> torch.Tensor:
    """The fork's WindowAttention buffer: for tokens i, j of a window, (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return (rows[:, None] - rows[None, :] + window - 1) * (2 * window - 1) + (cols[:, None] - cols[None, :] + window - 1)


def swin_fork_key_shapes(num_classes: int = 80) -> dict[str, tuple]:
    """Every state-dict key of the fork's cascade_mask_rcnn_swin_tiny_patch4_window7 model, with its shape."""
    shapes: dict[str, tuple] = {}
    embed, window = SWIN_T["embed_dim"], SWIN_T["window_size"]
    shapes.update({"backbone.patch_embed.proj.weight": (embed, 3, 4, 4), "backbone.patch_embed.proj.bias": (embed,),
                   "backbone.patch_embed.norm.weight": (embed,), "backbone.patch_embed.norm.bias": (embed,)})  # fmt: skip
    for stage, (depth, heads) in enumerate(zip(SWIN_T["depths"], SWIN_T["num_heads"])):
        dim = embed * 2**stage
        for block in range(depth):
            prefix = f"backbone.layers.{stage}.blocks.{block}."
            shapes.update({
                prefix + "norm1.weight": (dim,), prefix + "norm1.bias": (dim,),
                prefix + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads),
                prefix + "attn.relative_position_index": (window**2, window**2),
                prefix + "attn.qkv.weight": (3 * dim, dim), prefix + "attn.qkv.bias": (3 * dim,),
                prefix + "attn.proj.weight": (dim, dim), prefix + "attn.proj.bias": (dim,),
                prefix + "norm2.weight": (dim,), prefix + "norm2.bias": (dim,),
                prefix + "mlp.fc1.weight": (4 * dim, dim), prefix + "mlp.fc1.bias": (4 * dim,),
                prefix + "mlp.fc2.weight": (dim, 4 * dim), prefix + "mlp.fc2.bias": (dim,),
            })  # fmt: skip
        if stage < len(SWIN_T["depths"]) - 1:  # PatchMerging
            shapes.update({f"backbone.layers.{stage}.downsample.reduction.weight": (2 * dim, 4 * dim),
                           f"backbone.layers.{stage}.downsample.norm.weight": (4 * dim,),
                           f"backbone.layers.{stage}.downsample.norm.bias": (4 * dim,)})  # fmt: skip
    for stage in range(len(SWIN_T["depths"])):  # one output norm per out_indices entry
        shapes.update({f"backbone.norm{stage}.weight": (embed * 2**stage,), f"backbone.norm{stage}.bias": (embed * 2**stage,)})
    for level in range(4):
        shapes.update({f"neck.lateral_convs.{level}.conv.weight": (256, embed * 2**level, 1, 1), f"neck.lateral_convs.{level}.conv.bias": (256,),
                       f"neck.fpn_convs.{level}.conv.weight": (256, 256, 3, 3), f"neck.fpn_convs.{level}.conv.bias": (256,)})  # fmt: skip
    shapes.update({"rpn_head.rpn_conv.weight": (256, 256, 3, 3), "rpn_head.rpn_conv.bias": (256,),
                   "rpn_head.rpn_cls.weight": (3, 256, 1, 1), "rpn_head.rpn_cls.bias": (3,),
                   "rpn_head.rpn_reg.weight": (12, 256, 1, 1), "rpn_head.rpn_reg.bias": (12,)})  # fmt: skip
    for stage in range(3):
        prefix = f"roi_head.bbox_head.{stage}."
        for conv in range(4):  # ConvModule(conv without bias, SyncBN named "bn")
            shapes[f"{prefix}shared_convs.{conv}.conv.weight"] = (256, 256, 3, 3)
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{prefix}shared_convs.{conv}.bn.{name}"] = (256,)
            shapes[f"{prefix}shared_convs.{conv}.bn.num_batches_tracked"] = ()
        shapes.update({prefix + "shared_fcs.0.weight": (1024, 256 * 7 * 7), prefix + "shared_fcs.0.bias": (1024,),
                       prefix + "fc_cls.weight": (num_classes + 1, 1024), prefix + "fc_cls.bias": (num_classes + 1,),
                       prefix + "fc_reg.weight": (4 * num_classes, 1024), prefix + "fc_reg.bias": (4 * num_classes,)})  # fmt: skip
        prefix = f"roi_head.mask_head.{stage}."
        for conv in range(4):
            shapes.update({f"{prefix}convs.{conv}.conv.weight": (256, 256, 3, 3), f"{prefix}convs.{conv}.conv.bias": (256,)})
        shapes.update({prefix + "upsample.weight": (256, 256, 2, 2), prefix + "upsample.bias": (256,),
                       prefix + "conv_logits.weight": (num_classes, 256, 1, 1), prefix + "conv_logits.bias": (num_classes,)})  # fmt: skip
    return shapes


SMALL_INIT_STD = {"rpn_head.rpn_cls.weight": 0.1, "rpn_head.rpn_reg.weight": 0.01, "fc_reg.weight": 0.001, "fc_cls.weight": 0.08}
"""Output layers drawn narrower than N(0, 2/fan_in) (as mmdet initialises them), so that proposals and boxes stay
near their anchors and the class scores of a detection spread around 0.5."""
BACKGROUND_BIAS = 3.0


def random_swin_fork_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The fork's state dict with random values of a trained network's scale: norms near 1, weights ~ N(0, 2/fan_in)
    (output layers narrower), the real relative-position index, class biases ~ N(0, 1) and the background's 3."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=generator) * std + mean

    state = {}
    for key, shape in swin_fork_key_shapes().items():
        small_std = next((std for suffix, std in SMALL_INIT_STD.items() if key.endswith(suffix)), None)
        if key.endswith("relative_position_index"):
            value = fork_relative_position_index(SWIN_T["window_size"])
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(0, dtype=torch.int64)
        elif key.endswith("running_var"):
            value = 1.0 + normal(shape, 0.1).abs()
        elif "norm" in key.split(".")[-2] or key.split(".")[-2] == "bn":
            value = normal(shape, 0.05, 1.0 if key.endswith("weight") else 0.0)
        elif key.endswith("relative_position_bias_table"):
            value = normal(shape, 0.02)
        elif key.endswith("fc_cls.bias"):
            value = torch.cat([normal((shape[0] - 1,), 1.0), torch.tensor([BACKGROUND_BIAS])])
        elif key.endswith("bias") or key.endswith("running_mean"):
            value = normal(shape, 0.02)
        elif small_std is not None:
            value = normal(shape, small_std)
        else:
            value = normal(shape, (2.0 / int(np.prod(shape[1:]))) ** 0.5)
        state[key] = value
    return state


def write_swin_fork_checkpoint(path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """As the fork's mmcv 1.x runner saves epoch_36.pth: {'meta': {...}, 'state_dict': OrderedDict}."""
    from collections import OrderedDict

    from vision_attribution.formats.class_names import COCO_CLASSES

    meta = {"mmdet_version": "2.11.0", "mmcv_version": "1.3.1", "CLASSES": tuple(COCO_CLASSES), "epoch": 36, "iter": 131256,
            "config": "model = dict(type='CascadeRCNN', ...)", "time": "Tue May 11 12:00:00 2021"}  # fmt: skip
    torch.save({"meta": meta, "state_dict": OrderedDict(state if state is not None else random_swin_fork_state_dict())}, path)
    return path


DEEPLAB_FILE_NAMES = {"mobile": "deeplabv3_mobilenet_v3_large-fc3c493d.pth", "full": "deeplabv3_resnet101_coco-586e9e4e.pth"}
"""The names of torchvision's COCO_WITH_VOC_LABELS_V1 weight files, as a user downloads them."""


def deeplab_torchvision(model_type: str, aux_classifier: bool = True, calibrate: bool = True) -> torch.nn.Module:
    """torchvision's own DeepLabV3 (random weights, nothing downloaded), with the auxiliary classifier as in the
    published files. At initialisation the BatchNorm statistics shrink the features to ~1e-10, so that every pixel
    gets the same class: `calibrate` sets them from two photos (a training-mode pass), and the predicted class then
    varies over an image as with trained weights."""
    from skimage import data as photos
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, deeplabv3_resnet101

    torch.manual_seed(0)
    constructor = {"mobile": deeplabv3_mobilenet_v3_large, "full": deeplabv3_resnet101}[model_type]
    model = constructor(weights=None, weights_backbone=None, num_classes=21, aux_loss=aux_classifier)
    if calibrate:
        batch = torch.stack([torch.from_numpy(photo[:256, :256].copy()).permute(2, 0, 1).float() / 255 for photo in (photos.coffee(), photos.chelsea())])
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # a plain average of the batches seen
        with torch.no_grad():
            model.train()((batch - 0.45) / 0.225)
    return model.eval()


def write_deeplab_checkpoint(directory: Path, model_type: str, aux_classifier: bool = True) -> Path:
    """A bare state dict under torchvision's file name, as torchvision publishes COCO_WITH_VOC_LABELS_V1."""
    path = directory / DEEPLAB_FILE_NAMES[model_type]
    torch.save(deeplab_torchvision(model_type, aux_classifier).state_dict(), path)
    return path
