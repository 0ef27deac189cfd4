"""IDG over a hierarchy of pixel groups: image -> predicted segments -> superpixels (Sikdar et al., 2021).

Every node S of the tree gets IDG(S) = sum(IG over S) / |(x - x') * 1_S|, a dividend
d(S) = |IDG(S)| / sum over ALL nodes T of |IDG(T)|, and a value v(S) = d(S) + sum of v over its children,
so v(root) = 1 unless every IDG is 0. IDG is linear in IG: no gradients beyond IG are needed.
"""
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import slic

SLIC_COMPACTNESS = 10.0
MIN_PIXELS_PER_SUPERPIXEL = 4


def superpixel_image_of(inputs: torch.Tensor) -> np.ndarray:
    """(1, C, h, w) model input -> (h, w, 3) float64 in [0, 1]: the first 3 channels, each min-max scaled.

    A constant channel becomes 0; an input with fewer than 3 channels repeats its last one.
    """
    channels = inputs[0].detach().double().cpu()
    channels = channels[torch.arange(3).clamp_max(channels.shape[0] - 1)]
    low = channels.amin(dim=(1, 2), keepdim=True)
    spread = channels.amax(dim=(1, 2), keepdim=True) - low
    scaled = torch.where(spread > 0, (channels - low) / spread.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return scaled.permute(1, 2, 0).numpy()


def segment_hierarchy(
    integrated_grads: torch.Tensor,
    difference: torch.Tensor,
    segments: Optional[torch.Tensor],
    segment_labels: Sequence[str],
    superpixel_image: np.ndarray,
    n_superpixels: int,
) -> dict:
    """IDG, dividends and values of every node of the tree image -> segments -> superpixels.

    integrated_grads, difference (x - x'): (1, C, h, w). segments: boolean (M, h, w) in priority order
    (overlaps go to the first; uncovered pixels to a "rest" segment) or None (root -> superpixels).
    superpixel_image: (h, w, 3) in [0, 1] for SLIC. n_superpixels: the total over the image, shared by area.
    Returns CPU tensors over N breadth-first nodes (root = 0): label_map int32 (h, w) (leaf of each pixel),
    parent int64 (N,) (-1 for the root), depth int64 (N,), idg / dividend / value float64 (N,),
    pixels int64 (N,), and labels (list of N str).
    """
    if integrated_grads.dim() != 4 or integrated_grads.shape[0] != 1 or difference.shape != integrated_grads.shape:
        raise ValueError(
            f"integrated_grads and difference must both be (1, C, h, w), got {tuple(integrated_grads.shape)} and {tuple(difference.shape)}"
        )
    height, width = difference.shape[2:]
    if superpixel_image.shape[:2] != (height, width):
        raise ValueError(f"superpixel_image must be ({height}, {width}, 3), got {superpixel_image.shape}")
    if n_superpixels < 1:
        raise ValueError(f"n_superpixels must be at least 1, got {n_superpixels}")

    regions = _partition(segments, segment_labels, (height, width))
    labels = ["image"] + [label for label, _ in regions]
    parent = [-1] + [0] * len(regions)
    split_regions = regions if regions else [("image", np.ones((height, width), dtype=bool))]
    region_nodes = range(1, len(regions) + 1) if regions else [0]
    label_map = np.zeros((height, width), dtype=np.int32)
    for region_node, (label, region) in zip(region_nodes, split_regions):
        label_map[region] = region_node
        wanted = max(1, round(n_superpixels * int(region.sum()) / (height * width)))
        superpixels = _superpixels(superpixel_image, region, wanted)
        for index, superpixel in enumerate(superpixels, start=1):
            label_map[superpixel] = len(labels)
            labels.append(f"{label} superpixel {index}")
            parent.append(region_node)

    parent = np.array(parent, dtype=np.int64)
    depth = np.zeros(len(parent), dtype=np.int64)
    for node in range(1, len(parent)):
        depth[node] = depth[parent[node]] + 1
    leaf_of_pixel = label_map.ravel()
    ig_per_pixel = integrated_grads[0].detach().double().sum(0).cpu().numpy().ravel()
    squared_per_pixel = (difference[0].detach().double() ** 2).sum(0).cpu().numpy().ravel()
    ig_sum = _sum_up(np.bincount(leaf_of_pixel, ig_per_pixel, len(parent)), parent, depth)
    squared_sum = _sum_up(np.bincount(leaf_of_pixel, squared_per_pixel, len(parent)), parent, depth)
    pixels = _sum_up(np.bincount(leaf_of_pixel, minlength=len(parent)), parent, depth)
    norm = np.sqrt(squared_sum)
    idg = np.divide(ig_sum, norm, out=np.zeros_like(ig_sum), where=norm > 0)
    total = np.abs(idg).sum()
    dividend = np.abs(idg) / total if total > 0 else np.zeros_like(idg)
    return {
        "label_map": torch.from_numpy(label_map),
        "parent": torch.from_numpy(parent),
        "depth": torch.from_numpy(depth),
        "idg": torch.from_numpy(idg),
        "dividend": torch.from_numpy(dividend),
        "value": torch.from_numpy(_sum_up(dividend, parent, depth)),
        "pixels": torch.from_numpy(pixels.astype(np.int64)),
        "labels": labels,
    }


def _partition(segments: Optional[torch.Tensor], segment_labels: Sequence[str], size: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    """Disjoint non-empty (label, (h, w) mask) regions: each pixel to its first segment, the uncovered to "rest"."""
    if segments is None:
        return []
    masks = segments.detach().cpu().bool().numpy()
    if masks.ndim != 3 or masks.shape[1:] != size:
        raise ValueError(f"segments must be (M, {size[0]}, {size[1]}), got {tuple(segments.shape)}")
    if len(segment_labels) != len(masks):
        raise ValueError(f"{len(masks)} segments but {len(segment_labels)} labels")
    covered = np.zeros(size, dtype=bool)
    regions = []
    for label, mask in zip(segment_labels, masks):
        region = mask & ~covered
        covered |= region
        if region.any():
            regions.append((label, region))
    if not covered.all():
        regions.append(("rest", ~covered))
    return regions


def _superpixels(image: np.ndarray, region: np.ndarray, wanted: int) -> list[np.ndarray]:
    """SLIC inside the (h, w) region: disjoint (h, w) masks covering it, or [] when it is not split."""
    count = min(wanted, int(region.sum()) // MIN_PIXELS_PER_SUPERPIXEL)
    if count < 2:
        return []
    labels = slic(image, n_segments=count, compactness=SLIC_COMPACTNESS, start_label=1, channel_axis=-1, mask=region)
    if not labels[region].any():
        return []
    unlabelled = region & (labels == 0)
    if unlabelled.any():
        nearest = ndimage.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
        labels[unlabelled] = labels[tuple(axis[unlabelled] for axis in nearest)]
    present = np.unique(labels[region])
    if len(present) < 2:
        return []
    return [region & (labels == label) for label in present]


def _sum_up(leaf_values: np.ndarray, parent: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """(N,) per-node amounts plus everything below each node, deepest level first."""
    totals = leaf_values.copy()
    for level in range(int(depth.max()), 0, -1):
        at_level = depth == level
        np.add.at(totals, parent[at_level], totals[at_level])
    return totals
