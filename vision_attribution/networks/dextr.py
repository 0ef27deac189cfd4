"""DEXTR (Deep Extreme Cut): the ResNet-101 U-Net, its crop/heatmap/paste-back geometry, and its checkpoint readers.

The network and the geometry follow the seed's library, the `dextr` package 0.1.2 (MIT), line by line:
parameter names (`base_model.*` = torchvision's resnet101 with a 4-channel conv1, `line0_conv`, `decoder3..0`,
`final_dec_*`, `final_clf`), `net(x)['out']` logits, the relative padding and float crop bounds, the summed
Gaussian heatmap, the int-truncated PIL EXTENT image crop (zeros outside the image), the 4-channel
normalisation, and the uint8-quantised bilinear paste-back. This module is the only one that imports `dextr`,
and only to unpickle a whole `DextrModel` the user trusts (the published checkpoint's format).

Checkpoints (any file name):
  * a whole pickled `dextr.model.DextrModel` (torch.save of the object: the published weights) - trusted files only;
    its crop size, padding and sigma are taken from it;
  * this project's training checkpoint {"model": state dict, "crop": {"size", "padding", "blob_sigma"}, ...};
  * a plain state dict with the same parameter names (bare, or under "state_dict"/"model_state_dict"), with the
    default crop settings (512, 10, 10).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import resnet101

from .checkpoints import checkpoint_format, load_strictly, load_torch_file, read_state_dict

INPUT_MEAN = (0.485, 0.456, 0.406, 0.008)  # RGB: ImageNet; heatmap: measured on PASCAL VOC 2012 (dextr's values)
INPUT_STD = (0.229, 0.224, 0.225, 0.066)
NETWORK_STRIDE = 32  # crops must be a multiple of this for the U-Net's skip connections
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")


@dataclass(frozen=True)
class CropSettings:
    """How an object is cropped: size (h, w) of the network input, padding (pixels of the crop between the extreme
    points and its edge), blob_sigma (the heatmap's Gaussian sigma, in crop pixels)."""

    size: tuple[int, int] = (512, 512)
    padding: float = 10
    blob_sigma: float = 10.0

    def __post_init__(self):
        if len(self.size) != 2 or any(int(side) != side or side < NETWORK_STRIDE or side % NETWORK_STRIDE for side in self.size):
            raise ValueError(f"the DEXTR crop size must be two multiples of {NETWORK_STRIDE} (at least {NETWORK_STRIDE}), got {self.size}")
        if not 0 <= 2 * self.padding < min(self.size):
            raise ValueError(f"the DEXTR padding must be at least 0 and under half the crop size {self.size}, got {self.padding}")
        if not self.blob_sigma > 0:
            raise ValueError(f"the DEXTR heatmap sigma must be positive, got {self.blob_sigma}")

    def as_dict(self) -> dict:
        return {"size": [int(side) for side in self.size], "padding": float(self.padding), "blob_sigma": float(self.blob_sigma)}

    @classmethod
    def from_dict(cls, values: Mapping) -> "CropSettings":
        return cls(tuple(int(side) for side in values["size"]), float(values["padding"]), float(values["blob_sigma"]))


# Network ---------------------------------------------------------------------------------------------------------


class DecoderBlock(nn.Module):
    """x (B, C, h, w) upsampled x2 (nearest), plus the skip (B, C, 2h, 2w), conv 3x3 -> BN -> ReLU -> (B, out, 2h, 2w)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
        self.conv_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv_bn(self.conv(self.up(x) + skip)))


class ResUNet(nn.Module):
    """DEXTR's ResNet-101 U-Net: (B, 4, h, w) normalised RGB + heatmap -> {"out": (B, 1, h, w) mask logits}.

    `base_model` is torchvision's resnet101 with a 4-channel conv1; its `fc` is kept (unused) so that the
    published state dict loads strictly.
    """

    def __init__(self):
        super().__init__()
        self.base_model = resnet101(weights=None)
        self.base_model.conv1 = nn.Conv2d(4, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.line0_conv = nn.Conv2d(2048, 1024, 1)
        self.decoder3 = DecoderBlock(1024, 512)
        self.decoder2 = DecoderBlock(512, 256)
        self.decoder1 = DecoderBlock(256, 64)
        self.decoder0 = DecoderBlock(64, 64)
        self.final_dec_up = nn.Upsample(scale_factor=2)
        self.final_dec_conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.final_dec_drop = nn.Dropout(0.3)
        self.final_dec_bn = nn.BatchNorm2d(64)
        self.final_clf = nn.Conv2d(64, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        base = self.base_model
        r2 = x = base.bn1(base.conv1(x))  # the skip is taken before the ReLU, as in dextr
        x = base.maxpool(base.relu(x))
        r4 = x = base.layer1(x)
        r8 = x = base.layer2(x)
        r16 = x = base.layer3(x)
        x = self.line0_conv(base.layer4(x))
        x = self.decoder0(self.decoder1(self.decoder2(self.decoder3(x, r16), r8), r4), r2)
        x = self.final_dec_bn(self.final_dec_drop(self.final_dec_conv(self.final_dec_up(x))))
        return {"out": self.final_clf(F.relu(x))}


def new_network(resnet101_state_dict: Mapping[str, torch.Tensor] | None = None) -> ResUNet:
    """A trainable ResUNet: random (PyTorch's default init), or with its encoder from a torchvision resnet101 state
    dict (conv1's RGB filters copied, the heatmap channel's filters left at their random init, as dextr does)."""
    network = ResUNet()
    if resnet101_state_dict is not None:
        weights = dict(resnet101_state_dict)
        conv1 = weights.get("conv1.weight")
        if conv1 is None or tuple(conv1.shape) != (64, 3, 7, 7):
            raise ValueError(f"not a torchvision resnet101 state dict: conv1.weight is {None if conv1 is None else tuple(conv1.shape)}, expected (64, 3, 7, 7)")
        four_channels = network.base_model.conv1.weight.detach().clone()
        four_channels[:, :3] = conv1
        weights["conv1.weight"] = four_channels
        try:
            network.base_model.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise ValueError(f"not a torchvision resnet101 state dict: {error}") from error
    return network


def load_network(state_dict: Mapping[str, torch.Tensor]) -> ResUNet:
    """A ResUNet loaded strictly from a state dict with dextr's parameter names; eval mode, frozen."""
    with torch.device("meta"):
        network = ResUNet()
    return load_strictly(network, state_dict, "DEXTR ResNet-101 U-Net")


# Checkpoints -----------------------------------------------------------------------------------------------------


@dataclass
class DextrCheckpoint:
    state_dict: dict[str, torch.Tensor]
    crop: CropSettings
    source: str  # which format it was: "DextrModel", "training checkpoint", "state dict"


def read_checkpoint(path: str | Path, trust: bool = False) -> DextrCheckpoint:
    """Read any of the supported DEXTR checkpoint formats (module docstring), whatever the file's name."""
    path = Path(path)
    if checkpoint_format(path) != "torch":
        raise ValueError(f"{path.name} is a plain pickle, not a torch.save checkpoint of DEXTR")
    try:
        content = load_torch_file(path, trust=False)
    except ValueError as error:
        if not trust:
            if "dextr" in str(error):
                raise ValueError(
                    f"{path.name} is a whole pickled DextrModel (the dextr package's published format); reading it unpickles "
                    "the file, which runs code from it: archive.sh --trust-checkpoint reads it (only for a file you trust)"
                ) from error
            raise
        content = _unpickle_trusted(path)
    if _is_dextr_model(content):
        return _from_dextr_model(content)
    if isinstance(content, Mapping) and isinstance(content.get("crop"), Mapping) and isinstance(content.get("model"), Mapping):
        state_dict = read_state_dict(content["model"], (), "DEXTR")
        return DextrCheckpoint(state_dict, _crop_settings(content["crop"]), "training checkpoint")
    return DextrCheckpoint(read_state_dict(content, STATE_DICT_KEYS, "DEXTR"), CropSettings(), "state dict")


def _unpickle_trusted(path: Path):
    """Unpickle fully; a DextrModel needs the dextr package's classes, which the pickle names."""
    import dextr.model  # noqa: F401 - the module the pickle refers to (dextr 0.1.2, MIT)

    return load_torch_file(path, trust=True)


def _is_dextr_model(content) -> bool:
    return all(hasattr(content, name) for name in ("net", "target_size_yx", "padding", "blob_sigma"))


def _from_dextr_model(model) -> DextrCheckpoint:
    network = model.net
    if not isinstance(network, nn.Module):
        raise ValueError(f"the DextrModel's net is a {type(network).__name__}, not a PyTorch module")
    crop = _crop_settings({"size": tuple(model.target_size_yx), "padding": model.padding, "blob_sigma": model.blob_sigma})
    return DextrCheckpoint(read_state_dict(network.state_dict(), (), "DEXTR"), crop, "DextrModel")


def _crop_settings(values: Mapping) -> CropSettings:
    try:
        return CropSettings.from_dict(values)
    except (KeyError, TypeError) as error:
        raise ValueError(f"the checkpoint's crop settings {dict(values)} need size (h, w), padding and blob_sigma") from error


# Geometry: crop with heatmap, paste back ---------------------------------------------------------------------------


def crop_box(points_xy: np.ndarray, crop: CropSettings) -> np.ndarray:
    """(4, 2) extreme points [x, y] -> the crop [[top, left], [bottom, right]] (float64, may extend past the image):
    the points' bounds widened by their extent times padding / (size - 2 padding) on each side."""
    points_yx = np.asarray(points_xy, dtype=np.float64)[:, ::-1]
    relative_padding = crop.padding / (np.array(crop.size, dtype=np.float64) - 2 * crop.padding)
    lower, upper = points_yx.min(axis=0), points_yx.max(axis=0)
    extent = upper - lower
    return np.stack([lower - extent * relative_padding, upper + extent * relative_padding])


def point_heatmap(points_xy: np.ndarray, box_yx: np.ndarray, crop: CropSettings) -> np.ndarray:
    """(size) float64: the sum over the points of exp(-d^2 / (2 sigma^2)) around each point's place in the crop."""
    points_yx = np.asarray(points_xy, dtype=np.float64)[:, ::-1]
    in_crop = (points_yx - box_yx[0]) / np.maximum(box_yx[1] - box_yx[0], 1.0) * np.array(crop.size)
    gauss_y = np.exp(-0.5 * (np.arange(crop.size[0], dtype=np.float64) - in_crop[:, 0, None]) ** 2 / crop.blob_sigma**2)
    gauss_x = np.exp(-0.5 * (np.arange(crop.size[1], dtype=np.float64) - in_crop[:, 1, None]) ** 2 / crop.blob_sigma**2)
    return (gauss_y[:, :, None] * gauss_x[:, None, :]).sum(axis=0)


def crop_image(image: Image.Image, box_yx: np.ndarray, size: tuple[int, int], resample=Image.BILINEAR, truncate: bool = True) -> Image.Image:
    """The box of a PIL image scaled to size (h, w) by PIL's EXTENT transform; outside the image is 0. The seed
    truncates the image's bounds to int (toward zero); masks are cropped at the float bounds."""
    (top, left), (bottom, right) = box_yx
    bounds = (int(left), int(top), int(right), int(bottom)) if truncate else (left, top, right, bottom)
    return image.transform((size[1], size[0]), Image.EXTENT, data=bounds, resample=resample)


def network_input(image: np.ndarray, points_xy: np.ndarray, crop: CropSettings) -> tuple[torch.Tensor, np.ndarray]:
    """(H, W, 3) uint8 RGB and (4, 2) points [x, y] -> the normalised input (1, 4, h, w) float32 and the crop box
    [[top, left], [bottom, right]] (float32, as the seed carries it to the paste-back)."""
    box_yx = crop_box(points_xy, crop)
    rgb = np.asarray(crop_image(Image.fromarray(image), box_yx, crop.size), dtype=np.float32) / 255.0
    channels = np.append(rgb, point_heatmap(points_xy, box_yx, crop)[:, :, None], axis=2)
    tensor = torch.tensor(channels.transpose(2, 0, 1), dtype=torch.float32)
    mean = torch.tensor(INPUT_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(INPUT_STD, dtype=torch.float32)[:, None, None]
    return ((tensor - mean) / std)[None], box_yx.astype(np.float32)


def normalise(channels: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) RGB in [0, 1] + heatmap -> the network's input space."""
    mean = torch.tensor(INPUT_MEAN, dtype=channels.dtype, device=channels.device)[:, None, None]
    std = torch.tensor(INPUT_STD, dtype=channels.dtype, device=channels.device)[:, None, None]
    return (channels - mean) / std


def paste_probability(probability: np.ndarray, box_yx: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(h, w) probabilities in [0, 1] -> (H, W) uint8 (probability x 255, truncated) in the image: bilinearly
    resized into the box's pixels [floor(lower), ceil(upper)) clipped to the image; 0 elsewhere."""
    mask_size = np.array(probability.shape[:2])
    lower, upper = np.asarray(box_yx[0]), np.asarray(box_yx[1])
    extent = upper - lower
    lower_px = np.maximum(np.floor(lower).astype(int), 0)
    upper_px = np.minimum(np.ceil(upper).astype(int), np.array(image_size))
    source_lower = mask_size * (lower_px - lower) / extent
    source_upper = mask_size * (upper_px - lower) / extent
    out_size = upper_px - lower_px
    pasted = Image.new("L", (int(image_size[1]), int(image_size[0])), 0)
    if (out_size > 0).all():
        quantised = Image.fromarray((probability * 255.0).astype(np.uint8))
        resized = quantised.transform(
            (int(out_size[1]), int(out_size[0])), Image.EXTENT,
            data=(source_lower[1], source_lower[0], source_upper[1], source_upper[0]), resample=Image.BILINEAR,
        )  # fmt: skip
        pasted.paste(resized, (int(lower_px[1]), int(lower_px[0])))
    return np.asarray(pasted)
