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
