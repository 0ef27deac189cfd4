"""A small DEXTR dataset made from the photos that ship in installed packages, in VOC layout, and DEXTR checkpoints
in the users' formats (the published whole pickled DextrModel, a plain state dict)."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage import data as photos


def photo_set() -> list[np.ndarray]:
    import matplotlib.cbook

    grace = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    return [photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket(), grace]


def shape_mask(size: tuple[int, int], box: tuple[int, int, int, int], kind: str) -> np.ndarray:
    """Boolean (h, w) mask of an ellipse, triangle or diamond filling `box` (left, top, right, bottom)."""
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = box
    if kind == "ellipse":
        draw.ellipse(box, fill=1)
    elif kind == "triangle":
        draw.polygon([(left, bottom), ((left + right) // 2, top), (right, bottom)], fill=1)
    else:
        draw.polygon([((left + right) // 2, top), (right, (top + bottom) // 2), ((left + right) // 2, bottom), (left, (top + bottom) // 2)], fill=1)
    return np.asarray(canvas).astype(bool)


def write_voc_dataset(root: Path, images: int = 10, size: tuple[int, int] = (120, 160), seed: int = 0) -> tuple[Path, Path]:
    """root/images/NAME.jpg and root/masks/NAME.png (palette PNG as VOC's: 0 background, 1..k objects):
    photo backgrounds with one or two shapes cut out of other photos pasted on them."""
    rng = np.random.default_rng(seed)
    sources = [np.asarray(Image.fromarray(photo).resize((size[1], size[0]), Image.BILINEAR)) for photo in photo_set()]
    image_dir, mask_dir = root / "images", root / "masks"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192]
    for index in range(images):
        background = rng.integers(len(sources))
        image = sources[background].copy()
        ids = np.zeros(size, dtype=np.uint8)
        for instance in range(1, 1 + int(rng.integers(1, 3))):
            width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            left, top = int(rng.integers(0, size[1] - width)), int(rng.integers(0, size[0] - height))
            mask = shape_mask(size, (left, top, left + width, top + height), ("ellipse", "triangle", "diamond")[int(rng.integers(3))])
            texture = sources[(background + 1 + int(rng.integers(len(sources) - 1))) % len(sources)]
            image[mask] = texture[mask]
            ids[mask] = instance
        mask_image = Image.fromarray(ids, mode="P")
        mask_image.putpalette(palette)
        Image.fromarray(image).save(image_dir / f"{index:04d}.jpg", quality=95)
        mask_image.save(mask_dir / f"{index:04d}.png")
    return image_dir, mask_dir


def seed_resunet(constant_logit: float | None = None) -> torch.nn.Module:
    """The dextr package's own ResUNet-101 (random weights), built as its dextr_resunet101 builds it, without the
    pretrained download (and without its in-place write on a leaf tensor, which fails on current torch).
    constant_logit: the classifier's weights zeroed and its bias set to this, so every crop pixel gets this logit."""
    from dextr.architectures.resunet import ResUNet
    from torch import nn
    from torchvision import models

    torch.manual_seed(0)
    network = ResUNet(models.resnet101(weights=None), 1)
    network.base_model.conv1 = nn.Conv2d(4, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)
    pretrained_ids = {id(parameter) for parameter in network.base_model.parameters()}
    network.pretrained_parameters = list(network.base_model.parameters())
    network.new_parameters = [parameter for parameter in network.parameters() if id(parameter) not in pretrained_ids]
    if constant_logit is not None:
        with torch.no_grad():
            network.final_clf.weight.zero_()
            network.final_clf.bias.fill_(constant_logit)
    return network.eval()


def write_pickled_dextr_model(path: Path, size: int = 512, padding: int = 10, sigma: float = 10.0, constant_logit: float | None = None) -> Path:
    """The published checkpoint's format: torch.save of a whole dextr.model.DextrModel."""
    from dextr.model import DextrModel

    torch.save(DextrModel(seed_resunet(constant_logit), (size, size), padding, sigma), path)
    return path


def write_state_dict(path: Path) -> Path:
    """A plain state dict with the DextrModel's parameter names (e.g. torch.save(model.net.state_dict()))."""
    torch.save(seed_resunet().state_dict(), path)
    return path
