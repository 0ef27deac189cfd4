"""Guided IG's path (Kapishnikov et al., CVPR 2021): decided step by step, moving the features whose gradient is
smallest first.

At step s of n (s = 1 .. n) the point must come to L1 distance (1 - s/n) * |x - x'|_1 of the input. Features whose
straight-path position alpha fell behind alpha_s - max_dist are first brought up to it; then, repeatedly, the
`fraction` of the features with the smallest |gradient| (those not yet at alpha_s + max_dist) move towards their
position at alpha_s + max_dist, all the way or by the share gamma that lands exactly on the target distance. The
attribution adds (x_new - x_old) * g for each move, g the gradient at the step's starting point. With max_dist 0
the path is the straight one.

The arithmetic is that of the reference implementation (Google PAIR's saliency.core.GuidedIG), in float64: the
same order of operations, np.quantile's 'lower' rule for the threshold, and the same closeness test, so that the
two choose the same features.
"""
import math
from dataclasses import dataclass

import torch

CLOSENESS = 1e-9
"""A step has reached its target distance when the two agree within this, relatively or absolutely (math.isclose)."""
DEFAULT_FRACTION = 0.25
DEFAULT_MAX_DIST = 0.02


@dataclass(frozen=True)
class GuidedSpec:
    """Guided IG's settings: n_steps gradient evaluations, the fraction of features moved at once, and how far (as a
    share of the path, 0..1) a feature may run ahead of or behind the straight path."""

    n_steps: int
    fraction: float = DEFAULT_FRACTION
    max_dist: float = DEFAULT_MAX_DIST

    def __post_init__(self):
        if self.n_steps < 1 or not 0 < self.fraction <= 1 or not 0 <= self.max_dist <= 1:
            raise ValueError(f"Guided IG needs n_steps >= 1, 0 < fraction <= 1 and 0 <= max_dist <= 1, got {self}")

    adaptive = False  # as RuleSpec.adaptive: Guided IG has no tolerance

    @property
    def most_steps(self) -> int:
        """The path points it uses (as RuleSpec.most_steps)."""
        return self.n_steps


class GuidedPath:
    """One Guided IG path from baseline to inputs, (1, C, H, W) each, in float64; `point` is where the next gradient
    is taken, `attribution` the sum so far."""

    def __init__(self, inputs: torch.Tensor, baseline: torch.Tensor, spec: GuidedSpec):
        self.inputs, self.baseline, self.spec = inputs.double(), baseline.double(), spec
        self.point = self.baseline.clone()
        self.difference = self.inputs - self.baseline
        self.total_distance = float(self.difference.abs().sum())
        self.attribution = torch.zeros_like(self.inputs)
        self.steps_done = 0

    def along(self, alpha: float) -> torch.Tensor:
        """The straight path's point at alpha."""
        return self.baseline + self.difference * alpha

    def advance(self, gradient: torch.Tensor) -> None:
        """Take step steps_done + 1 with the gradient (1, C, H, W) at the current point."""
        self.steps_done += 1
        if self.total_distance == 0:
            return
        gradient = gradient.double()
        spec, step = self.spec, self.steps_done
        alpha = step / spec.n_steps
        alpha_min, alpha_max = max(alpha - spec.max_dist, 0.0), min(alpha + spec.max_dist, 1.0)
        lowest, highest = self.along(alpha_min), self.along(alpha_max)
        target = self.total_distance * (1 - step / spec.n_steps)
        ranked = gradient.clone()
        point = self.point
        while True:
            before = point.clone()
            position = torch.where(self.difference != 0, (point - self.baseline) / self.difference, torch.full_like(point, alpha_max))
            behind = position < alpha_min
            point[behind] = lowest[behind]
            distance = float((point - self.inputs).abs().sum())
            if math.isclose(target, distance, rel_tol=CLOSENESS, abs_tol=CLOSENESS):
                self.attribution += (point - before) * gradient
                return
            ranked[point == highest] = torch.inf
            magnitude = ranked.abs().reshape(-1)
            threshold = torch.kthvalue(magnitude, int(math.floor((magnitude.numel() - 1) * spec.fraction)) + 1).values
            selected = (ranked.abs() <= threshold) & (ranked != torch.inf)
            movable = float(((point - highest).abs() * selected).sum())
            share = (distance - target) / movable if movable > 0 else math.inf
            if share > 1.0:
                point[selected] = highest[selected]
            else:
                point[selected] = (point + (highest - point) * share)[selected]
            self.attribution += (point - before) * gradient
            if share <= 1.0:
                return
