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
from typing import Optional

import torch

CLOSENESS = 1e-9
"""A step has reached its target distance when the two agree within this, relatively or absolutely (math.isclose)."""
DEFAULT_FRACTION = 0.25
DEFAULT_MAX_DIST = 0.02
FIRST_STEPS = 16
"""With a tolerance, the first path's steps; each next path has twice as many."""


@dataclass(frozen=True)
class GuidedSpec:
    """Guided IG's settings: n_steps gradient evaluations, the fraction of features moved at once, and how far (as a
    share of the path, 0..1) a feature may run ahead of or behind the straight path. With a tolerance, paths of 16,
    32, 64, ... steps (at most max_steps) are run until one's completeness error is at most tolerance * |F(x) - F(x')|
    (the path depends on its number of steps, so each is a new path; n_steps is then unused)."""

    n_steps: int = 50
    fraction: float = DEFAULT_FRACTION
    max_dist: float = DEFAULT_MAX_DIST
    tolerance: Optional[float] = None
    max_steps: int = 257

    def __post_init__(self):
        if self.n_steps < 1 or not 0 < self.fraction <= 1 or not 0 <= self.max_dist <= 1 or self.max_steps < FIRST_STEPS:
            raise ValueError(f"Guided IG needs n_steps >= 1, 0 < fraction <= 1, 0 <= max_dist <= 1 and max_steps >= {FIRST_STEPS}, got {self}")

    least_max_steps = FIRST_STEPS

    @property
    def adaptive(self) -> bool:
        return self.tolerance is not None

    @property
    def most_steps(self) -> int:
        """The most steps of the path it returns (as RuleSpec.most_steps)."""
        return self.max_steps if self.adaptive else self.n_steps

    @property
    def first_steps(self) -> int:
        return FIRST_STEPS if self.adaptive else self.n_steps


class GuidedPath:
    """One Guided IG path from baseline to inputs, (1, C, H, W) each, in float64; `point` is where the next gradient
    is taken, `attribution` the sum so far."""

    def __init__(self, inputs: torch.Tensor, baseline: torch.Tensor, spec: GuidedSpec, n_steps: int):
        self.inputs, self.baseline, self.spec, self.n_steps = inputs.double(), baseline.double(), spec, n_steps
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
        alpha = step / self.n_steps
        alpha_min, alpha_max = max(alpha - spec.max_dist, 0.0), min(alpha + spec.max_dist, 1.0)
        lowest, highest = self.along(alpha_min), self.along(alpha_max)
        target = self.total_distance * (1 - step / self.n_steps)
        ranked, point = gradient, self.point
        moving = self.difference != 0
        while True:
            before = point
            position = torch.where(moving, (point - self.baseline) / self.difference, alpha_max)
            point = torch.where(position < alpha_min, lowest, point)
            distance = float((point - self.inputs).abs().sum())
            if math.isclose(target, distance, rel_tol=CLOSENESS, abs_tol=CLOSENESS):
                self.attribution += (point - before) * gradient
                break
            ranked = ranked.masked_fill(point == highest, torch.inf)
            magnitude = ranked.abs()
            threshold = torch.kthvalue(magnitude.reshape(-1), int(math.floor((magnitude.numel() - 1) * spec.fraction)) + 1).values
            selected = (magnitude <= threshold) & (ranked != torch.inf)
            movable = float(((point - highest).abs() * selected).sum())
            share = (distance - target) / movable if movable > 0 else math.inf
            point = torch.where(selected, highest if share > 1.0 else point + (highest - point) * share, point)
            self.attribution += (point - before) * gradient
            if share <= 1.0:
                break
        self.point = point
