"""Train or fine-tune DEXTR on images with instance masks (the seed's dextr_train).

  vision-attribution dextr-train --images DIR --masks DIR --out OUT [--val-images DIR --val-masks DIR | --val-fraction 0.1]
      [--steps 2000] [--batch-size 4] [--optimizer sgd|adam] [--lr 0.01] [--crop-size 512] [--padding 10] [--blob-sigma 10]
      [--init-resnet101 FILE | --init-checkpoint FILE [--trust-checkpoint]] [--resume] [--checkpoint-every 100] [--val-every 100]

Data (VOC style): DIR/NAME.jpg|jpeg|png with MASKS/NAME.png, an indexed (palette) or grey PNG whose values are
instance ids: 0 background, 255 void (neither object nor background of another object), any other value one object.
Recipe (DEXTR's): for each object, extreme points taken from its mask (a random mask pixel within --extreme-range
pixels of each extreme side) plus Gaussian jitter (--jitter), random horizontal flips, the crop and point heatmap
exactly as they are served, and a class-balanced binary cross-entropy on the crop's mask logits. Held-out objects
get their exact extreme points and are segmented as the server does (crop, network, paste-back, threshold 0.5);
their mean IoU is reported before training and every --val-every steps.
Start: from scratch, from a torchvision resnet101 state dict (--init-resnet101; the heatmap channel's filters
start random), or from any DEXTR checkpoint archive.sh reads (--init-checkpoint).
Output: OUT/checkpoint.pt ({"model", "crop", "optimizer", "step", "history", ...}, loadable with weights_only=True):
`archive.sh dextr --checkpoint OUT/checkpoint.pt` serves it and --resume continues it; OUT/metrics.json.
"""
import argparse
import json
import math
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..formats.decode import decode_image_bytes
from ..networks.checkpoints import load_torch_file, read_state_dict
from ..networks.dextr import CropSettings, crop_image, network_input, new_network, paste_probability, read_checkpoint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VOID = 255
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"


class InstanceMasks:
    """Objects of a folder of images with VOC-style instance masks: object k = (image index, instance id)."""

    def __init__(self, images_dir: Path, masks_dir: Path, min_pixels: int):
        self.pairs = []
        for image in sorted(images_dir.iterdir()):
            mask = masks_dir / f"{image.stem}.png"
            if image.suffix.lower() in IMAGE_SUFFIXES and mask.is_file():
                self.pairs.append((image, mask))
        if not self.pairs:
            raise ValueError(f"no image in {images_dir} has a mask {masks_dir}/NAME.png")
        self.objects = []
        for index in range(len(self.pairs)):
            ids, counts = np.unique(self.instance_ids(index), return_counts=True)
            self.objects += [(index, int(i)) for i, n in zip(ids, counts) if i not in (0, VOID) and n >= min_pixels]

    def instance_ids(self, index: int) -> np.ndarray:
        """(H, W) instance ids of image `index`."""
        with Image.open(self.pairs[index][1]) as mask:
            if mask.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(f"{self.pairs[index][1]} is a {mask.mode} image; instance masks must be indexed (palette) or grey PNGs")
            return np.asarray(mask).astype(np.int64)

    @lru_cache(maxsize=64)
    def image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        return decode_image_bytes(self.pairs[index][0].read_bytes())

    def subset(self, image_indices: set[int]) -> list[tuple[int, int]]:
        return [(image, instance) for image, instance in self.objects if image in image_indices]


def extreme_points(mask: np.ndarray, rng: Optional[np.random.Generator], extreme_range: float = 5, jitter: float = 1.0) -> np.ndarray:
    """(4, 2) points [x, y]: top, bottom, left, right of a boolean (H, W) mask. With `rng`: a random mask pixel within
    `extreme_range` of each extreme side plus Gaussian jitter (training); without: the middle pixel of each side."""
    ys, xs = np.nonzero(mask)
    sides = (ys <= ys.min() + (extreme_range if rng else 0), ys >= ys.max() - (extreme_range if rng else 0),
             xs <= xs.min() + (extreme_range if rng else 0), xs >= xs.max() - (extreme_range if rng else 0))  # fmt: skip
    points = []
    for side in sides:
        candidates = np.flatnonzero(side)
        pick = candidates[rng.integers(len(candidates))] if rng else candidates[len(candidates) // 2]
        points.append([xs[pick], ys[pick]])
    points = np.asarray(points, dtype=np.float64)
    return points + rng.normal(0.0, jitter, points.shape) if rng else points


def training_example(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop: CropSettings, extreme_range: float, jitter: float):
    """One object -> (input (4, h, w), target (1, h, w) in [0, 1]), flipped horizontally half the time."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    points = extreme_points(mask, rng, extreme_range, jitter)
    tensor, box_yx = network_input(np.ascontiguousarray(image), points, crop)
    target = crop_image(Image.fromarray(mask.astype(np.uint8) * 255), box_yx.astype(np.float64), crop.size, truncate=False)
    return tensor[0], torch.from_numpy(np.asarray(target, dtype=np.float32) / 255.0)[None]


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DEXTR's loss: BCE with each crop's pixels weighted by the other class's share (foreground 1 - p, background p)."""
    share = target.mean(dim=(1, 2, 3), keepdim=True)
    return F.binary_cross_entropy_with_logits(logits, target, weight=share + (1 - 2 * share) * target)


@torch.no_grad()
def mean_iou(network: torch.nn.Module, data: InstanceMasks, objects: list, crop: CropSettings, device: torch.device, batch_size: int) -> float:
    """Mean IoU of held-out objects segmented as served: exact extreme points, crop, network, paste-back, >= 0.5.
    Void pixels count for neither side."""
    network.eval()
    ious = []
    for start in range(0, len(objects), batch_size):
        batch = objects[start : start + batch_size]
        inputs, boxes, truths = [], [], []
        for image_index, instance in batch:
            ids = data.instance_ids(image_index)
            tensor, box = network_input(data.image(image_index), extreme_points(ids == instance, None), crop)
            inputs.append(tensor)
            boxes.append(box)
            truths.append((ids == instance, ids != VOID))
        probabilities = torch.sigmoid(network(torch.cat(inputs).to(device))["out"][:, 0]).cpu().numpy()
        for probability, box, (truth, valid) in zip(probabilities, boxes, truths):
            predicted = paste_probability(probability, box, truth.shape) >= 128  # 0.5 of the uint8 probability
            union = ((predicted | truth) & valid).sum()
            ious.append(((predicted & truth) & valid).sum() / union if union else 1.0)
    return float(np.mean(ious)) if ious else float("nan")


def save_atomically(payload: dict, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def split_images(count: int, fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """Image indices for training and validation; at least one of each when there are two or more images."""
    order = np.random.default_rng(seed).permutation(count)
    held_out = min(count - 1, max(1, round(count * fraction))) if count > 1 and fraction > 0 else 0
    return set(order[held_out:].tolist()), set(order[:held_out].tolist())


def initial_network(args: argparse.Namespace) -> tuple[torch.nn.Module, Optional[CropSettings], bool]:
    """The network to start from, the crop settings of a DEXTR checkpoint (or None), whether it was pretrained."""
    if args.init_checkpoint:
        checkpoint = read_checkpoint(args.init_checkpoint, trust=args.trust_checkpoint)
        network = new_network()
        network.load_state_dict({key: value.float() if value.is_floating_point() else value for key, value in checkpoint.state_dict.items()})
        return network, checkpoint.crop, True
    if args.init_resnet101:
        state_dict = read_state_dict(load_torch_file(args.init_resnet101, trust=False), ("state_dict", "model"), "torchvision resnet101")
        return new_network(state_dict), None, True
    return new_network(), None, False


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.out / CHECKPOINT_FILE
    resumed = torch.load(checkpoint_path, map_location="cpu", weights_only=True) if args.resume and checkpoint_path.exists() else None
    if args.resume and resumed is None:
        raise ValueError(f"--resume: there is no {checkpoint_path} to resume")

    network, checkpoint_crop, pretrained = initial_network(args) if resumed is None else (new_network(), None, resumed["pretrained"])
    base = CropSettings.from_dict(resumed["crop"]) if resumed else (checkpoint_crop or CropSettings())
    crop = CropSettings(
        (args.crop_size, args.crop_size) if args.crop_size else base.size,
        base.padding if args.padding is None else args.padding,
        base.blob_sigma if args.blob_sigma is None else args.blob_sigma,
    )
    if resumed:
        network.load_state_dict(resumed["model"])
    network.to(device)

    data = InstanceMasks(args.images, args.masks, args.min_pixels)
    if args.val_images:
        validation_data = InstanceMasks(args.val_images, args.val_masks or args.masks, args.min_pixels)
        training_objects, validation_objects = data.objects, validation_data.objects
    else:
        train_images, val_images = split_images(len(data.pairs), args.val_fraction, args.seed)
        validation_data, training_objects, validation_objects = data, data.subset(train_images), data.subset(val_images)
    if not training_objects:
        raise ValueError(f"no object of at least {args.min_pixels} pixels to train on")

    backbone = list(network.base_model.parameters())
    backbone_ids = {id(parameter) for parameter in backbone}
    head = [parameter for parameter in network.parameters() if id(parameter) not in backbone_ids]
    backbone_factor = args.backbone_lr_factor if args.backbone_lr_factor is not None else (0.1 if pretrained else 1.0)
    groups = [{"params": backbone, "lr": args.lr * backbone_factor}, {"params": head, "lr": args.lr}]
    optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=args.weight_decay) if args.optimizer == "sgd" else torch.optim.Adam(groups)
    base_lrs = [group["lr"] for group in groups]
    history = {"loss": [], "val_iou": []}
    start = 0
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        history, start = resumed["history"], resumed["step"]
        rng.bit_generator.state = resumed["numpy_rng"]
        torch.set_rng_state(resumed["torch_rng"])

    def validate(step: int) -> None:
        if validation_objects:
            history["val_iou"].append([step, mean_iou(network, validation_data, validation_objects, crop, device, args.batch_size)])

    def save(step: int) -> None:
        save_atomically({
            "model": network.state_dict(), "crop": crop.as_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "history": history, "pretrained": pretrained, "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
        }, checkpoint_path)  # fmt: skip

    if start == 0:
        validate(0)
    progress = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, desc="dextr-train", unit="step", file=sys.stderr)
    for step in progress:
        network.train()
        scale = (1 - (step - 1) / args.steps) ** 0.9 if args.lr_schedule == "poly" else 1.0
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * scale
        examples = []
        for index in rng.integers(len(training_objects), size=args.batch_size):
            image_index, instance = training_objects[index]
            examples.append(training_example(data.image(image_index), data.instance_ids(image_index) == instance, rng, crop, args.extreme_range, args.jitter))
        inputs, targets = (torch.stack(column).to(device) for column in zip(*examples))
        loss = balanced_bce(network(inputs)["out"], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss became {float(loss)} at step {step}; lower --lr")
        history["loss"].append([step, loss.item()])
        if step % args.val_every == 0 or step == args.steps:
            validate(step)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save(step)
        progress.set_postfix(loss=f"{loss.item():.4f}", val_iou=f"{history['val_iou'][-1][1]:.3f}" if history["val_iou"] else "-")
    progress.close()
    metrics = {"steps": args.steps, "crop": crop.as_dict(), "training_objects": len(training_objects), "validation_objects": len(validation_objects), "history": history}
    (args.out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, required=True, help="folder of training images")
    parser.add_argument("--masks", type=Path, required=True, help="folder of their instance masks, NAME.png")
    parser.add_argument("--out", type=Path, required=True, help="where checkpoint.pt and metrics.json go")
    parser.add_argument("--val-images", type=Path, help="held-out images (default: --val-fraction of --images)")
    parser.add_argument("--val-masks", type=Path, help="their masks (default: --masks)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the images held out when no --val-images (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2000, help="optimisation steps in all, including resumed ones (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="objects per step (default: %(default)s)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="SGD with Nesterov momentum 0.9 as DEXTR, or Adam (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the new layers (default: %(default)s)")
    parser.add_argument("--backbone-lr-factor", type=float, help="learning rate factor of the ResNet (default: 0.1 when it starts pretrained, else 1)")
    parser.add_argument("--lr-schedule", choices=("poly", "constant"), default="poly", help="poly: lr x (1 - step/steps)^0.9 (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default: %(default)s)")
    parser.add_argument("--crop-size", type=int, help="crop side, a multiple of 32 (default: the checkpoint's, else 512)")
    parser.add_argument("--padding", type=float, help="crop pixels between the points and the crop's edge (default: the checkpoint's, else 10)")
    parser.add_argument("--blob-sigma", type=float, help="the heatmap's Gaussian sigma in crop pixels (default: the checkpoint's, else 10)")
    parser.add_argument("--extreme-range", type=float, default=5, help="pixels from each extreme side a training point may lie (default: %(default)s)")
    parser.add_argument("--jitter", type=float, default=1.0, help="std of the Gaussian noise added to training points, pixels (default: %(default)s)")
    parser.add_argument("--min-pixels", type=int, default=16, help="smaller objects are skipped (default: %(default)s)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--init-resnet101", type=Path, help="a torchvision resnet101 state dict for the encoder")
    start.add_argument("--init-checkpoint", type=Path, help="a DEXTR checkpoint to fine-tune (any format archive.sh dextr reads)")
    start.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt up to --steps")
    parser.add_argument("--trust-checkpoint", action="store_true", help="unpickle --init-checkpoint fully (a pickled DextrModel): trusted files only")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: %(default)s)")
    parser.add_argument("--val-every", type=int, default=100, help="steps between validations (default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        metrics = train(args)
    except (ValueError, FloatingPointError, OSError) as error:
        print(f"dextr-train: {error}", file=sys.stderr)
        return 2
    ious = metrics["history"]["val_iou"]
    if ious:
        print(f"held-out mean IoU: {ious[0][1]:.3f} at step {ious[0][0]} -> {ious[-1][1]:.3f} at step {ious[-1][0]} ({metrics['validation_objects']} objects)")
    print(f"wrote {args.out / CHECKPOINT_FILE} (archive.sh dextr --checkpoint {args.out / CHECKPOINT_FILE})")
    return 0
