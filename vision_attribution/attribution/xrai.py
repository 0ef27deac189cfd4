"""XRAI (Kapishnikov et al., ICCV 2019): regions ranked by how densely they hold an attribution.

Candidate regions come from several Felzenszwalb over-segmentations of the model input, each segment dilated; the
regions are then chosen greedily: at every step the candidate whose pixels not yet chosen have the highest mean
attribution (its gain) is added, candidates adding fewer than `min_pixel_diff` new pixels are dropped, until the
candidates run out; pixels no candidate covered form the last region. The chosen regions, ranked by gain, are the
explanation: a rank per pixel and a gain per region.

The settings are those of the paper's reference implementation (Google PAIR's saliency.core.XRAI, full algorithm):
the input rescaled to [-1, 1] and resized to 224 x 224 (cubic, anti-aliased) for segmenting, scales 50 .. 1200,
sigma 0.8, segments of at least 150 pixels, resized back (nearest) and dilated by a disk of radius 5; the attribution
per pixel is the maximum over channels.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from skimage.segmentation import felzenszwalb
from skimage.transform import resize

SEGMENTATION_SIZE = (224, 224)
SCALES = (50, 100, 150, 250, 500, 1200)
SMOOTHING_SIGMA = 0.8
MIN_SEGMENT_SIZE = 150
DILATION_RADIUS = 5
MIN_PIXEL_DIFF = 50
CHUNK = 32
"""Candidates dilated, counted and summed at a time (the memory of a few int64 or float64 copies of 32 masks)."""


@dataclass
class XraiRegions:
    """The ranked regions over an (h, w) input: R regions, rank 1 the densest."""

    ranks: torch.Tensor  # (h, w) int64: each pixel's region rank, 1..R
    gains: torch.Tensor  # (R,) float64: each region's gain (the mean attribution of its pixels when it was added)
    heatmap: torch.Tensor  # (h, w) float64: each pixel's region gain

    def masks(self) -> torch.Tensor:
        """(R, h, w) bool: region r - 1 at index r - 1."""
        return self.ranks.unsqueeze(0) == torch.arange(1, len(self.gains) + 1).view(-1, 1, 1)


def over_segmentations(inputs: torch.Tensor) -> list[np.ndarray]:
    """The model input (1, C, h, w) -> the six Felzenszwalb label maps (224, 224) of its colour channels, the first
    three (dextr's fourth, its points' heatmap, is not image content), rescaled to [-1, 1]."""
    image = inputs[0, :3].permute(1, 2, 0).double().cpu().numpy()
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / ((high - low) or 1.0) * 2.0 - 1.0
    scaled = resize(scaled, SEGMENTATION_SIZE, order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    return [felzenszwalb(scaled, scale=scale, sigma=SMOOTHING_SIGMA, min_size=MIN_SEGMENT_SIZE) for scale in SCALES]


def candidate_bytes(segmentations: list[np.ndarray], size: tuple[int, int]) -> int:
    """About the peak memory of XRAI's candidates over an (h, w) input: four bytes a pixel of at most one mask per
    segment (resizing can only drop segments); measured 3.5 (1.2 GiB for 351 candidates at 800 x 1333)."""
    return 4 * sum(int(labels.max()) + 1 for labels in segmentations) * size[0] * size[1]


def candidate_regions(segmentations: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Every segment of every over-segmentation, resized to the input's (h, w) (nearest) and dilated: (M, h, w) bool."""
    masks = []
    for segments in segmentations:
        segments = resize(segments, size, order=0, preserve_range=True, mode="constant", anti_aliasing=False).astype(np.int64)
        labels = torch.from_numpy(segments)
        masks.append(labels.unsqueeze(0) == torch.arange(int(labels.min()), int(labels.max()) + 1).view(-1, 1, 1))
    return dilate(torch.cat(masks), DILATION_RADIUS)


def dilate(masks: torch.Tensor, radius: int, chunk: int = CHUNK) -> torch.Tensor:
    """(M, h, w) bool dilated by a disk of `radius` (skimage.morphology.disk: x^2 + y^2 <= radius^2), nothing
    outside the image: the horizontal dilations by half-widths 0 .. radius (each one more shifted OR than the last),
    then for each row offset dy the one of half-width isqrt(radius^2 - dy^2), shifted by dy; `chunk` masks at a time."""
    height, width = masks.shape[1:]
    dilated = torch.zeros_like(masks)
    for start in range(0, len(masks), chunk):
        block, result = masks[start : start + chunk], dilated[start : start + chunk]
        horizontal = [block]
        for half in range(1, radius + 1):
            wider = horizontal[-1].clone()
            wider[:, :, half:] |= block[:, :, : width - half]
            wider[:, :, : width - half] |= block[:, :, half:]
            horizontal.append(wider)
        for dy in range(-radius, radius + 1):
            rows = horizontal[math.isqrt(radius**2 - dy**2)]
            if dy >= 0:
                result[:, : height - dy] |= rows[:, dy:]
            else:
                result[:, -dy:] |= rows[:, : height + dy]
    return dilated


def _by_rows(pool: torch.Tensor, reduce, chunk: int = CHUNK) -> torch.Tensor:
    """reduce (b, P) -> (b,) over the bool (M, P) `pool`, `chunk` rows at a time: (M,). (A bool sum or a float64
    matrix product of all M rows at once makes an int64 or float64 copy of the whole pool.)"""
    return torch.cat([reduce(pool[start : start + chunk]) for start in range(0, len(pool), chunk)])


def rank_regions(attribution: torch.Tensor, candidates: torch.Tensor, min_pixel_diff: int = MIN_PIXEL_DIFF) -> XraiRegions:
    """XRAI's greedy choice. attribution: (h, w) per pixel; candidates: (M, h, w) bool. Ties go to the first candidate.
    Each candidate's count and sum of not yet chosen pixels are kept and lowered by the pixels each choice covers,
    so that the whole choice reads every (candidate, pixel) pair about once."""
    height, width = attribution.shape
    values = attribution.reshape(-1).double()
    pool = candidates.reshape(len(candidates), -1)
    counts, sums = _by_rows(pool, lambda rows: rows.sum(1)), _by_rows(pool, lambda rows: rows.double() @ values)
    remaining = torch.ones(len(pool), dtype=torch.bool)
    chosen = torch.zeros(height * width, dtype=torch.bool)
    added: list[tuple[torch.Tensor, float]] = []
    while True:
        remaining &= counts >= min_pixel_diff
        if not bool(remaining.any()):
            break
        gains = torch.where(remaining, sums / counts.clamp_min(1), -torch.inf)
        best = int(gains.argmax())
        new_pixels = pool[best] & ~chosen
        added.append((new_pixels, float(gains[best])))
        covered = new_pixels.nonzero().squeeze(1)
        newly = pool[:, covered]
        newly_values = values[covered]
        counts, sums = counts - _by_rows(newly, lambda rows: rows.sum(1)), sums - _by_rows(newly, lambda rows: rows.double() @ newly_values)
        chosen |= new_pixels
        remaining[best] = False
    regions = [mask for mask, _ in sorted(added, key=lambda item: -item[1])]
    gains = sorted((gain for _, gain in added), reverse=True)
    if not bool(chosen.all()):
        regions.append(~chosen)
        gains.append(float(values[~chosen].mean()))
    ranks = torch.zeros(height * width, dtype=torch.int64)
    heatmap = torch.zeros(height * width, dtype=torch.float64)
    for rank, (mask, gain) in enumerate(zip(regions, gains), start=1):
        ranks[mask], heatmap[mask] = rank, gain
    return XraiRegions(ranks.view(height, width), torch.tensor(gains, dtype=torch.float64), heatmap.view(height, width))


def xrai(attribution: torch.Tensor, inputs: torch.Tensor, segmentations: list[np.ndarray] | None = None) -> XraiRegions:
    """XRAI regions of an attribution (1, C, h, w) over the model input inputs (1, C, h, w) it explains, from its
    over_segmentations (computed here unless given); the attribution per pixel is the maximum over all channels."""
    segmentations = over_segmentations(inputs) if segmentations is None else segmentations
    return rank_regions(attribution[0].double().amax(0).cpu(), candidate_regions(segmentations, tuple(inputs.shape[2:])))
