"""Explanations made of several straight paths, and how their integrals combine.

    expected gradients   K baselines x'_k to one input x (Erion et al. 2021): the mean of IG_k, and its spread
    SmoothGrad over IG   K noisy inputs x + e_k from one baseline (Smilkov et al. 2017), aggregated as
                         smoothgrad (mean IG_k), smoothgrad_sq (mean IG_k^2) or vargrad (mean IG_k^2 - (mean IG_k)^2)

Each path is an ordinary PathProblem: integrate_paths computes the paths with every other explanation of the batch
in shared chunks, so memory is one chunk plus input-sized accumulators per path, whatever K and the steps.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .engine import PathIntegral

AGGREGATIONS = ("smoothgrad", "smoothgrad_sq", "vargrad")


@dataclass
class CombinedIntegral:
    """K >= 1 path integrals of one explanation. attribution, spread: (1, C, H, W) in the paths' dtype."""

    attribution: torch.Tensor  # mean IG_k; mean IG_k^2 for smoothgrad_sq; their variance for vargrad
    spread: torch.Tensor  # per-value standard deviation of IG_k across the paths (population, ddof 0)
    paths: list[PathIntegral]
    idg: Optional[torch.Tensor] = None  # (M,) float64: the mean over paths of IDG_k per group
    idg_dividends: Optional[torch.Tensor] = None  # (M,) float64: |idg| / sum |idg|

    @property
    def convergence_delta(self) -> float:
        """The mean of the paths' completeness errors F(x_k) - F(x'_k) - sum(IG_k)."""
        return sum(path.convergence_delta for path in self.paths) / len(self.paths)


def combine_paths(paths: list[PathIntegral], aggregation: str = "smoothgrad") -> CombinedIntegral:
    """Combine path integrals (each (1, C, H, W) IG) by `aggregation` (AGGREGATIONS; expected gradients use the mean,
    "smoothgrad"); statistics are accumulated in float64."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    stacked = torch.cat([path.integrated_grads.double() for path in paths])
    mean, mean_square = stacked.mean(0, keepdim=True), (stacked**2).mean(0, keepdim=True)
    variance = (mean_square - mean**2).clamp_min(0.0)
    attribution = {"smoothgrad": mean, "smoothgrad_sq": mean_square, "vargrad": variance}[aggregation]
    dtype = paths[0].integrated_grads.dtype
    combined = CombinedIntegral(attribution.to(dtype), variance.sqrt().to(dtype), paths)
    if paths[0].idg is not None:
        combined.idg = torch.stack([path.idg for path in paths]).mean(0)
        total = combined.idg.abs().sum()
        combined.idg_dividends = combined.idg.abs() / total if total > 0 else torch.zeros_like(combined.idg)
    return combined
