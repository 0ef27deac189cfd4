"""Quadrature rules on [0, 1] for path integrals: where to sample the path and how to weight it.

A rule hands the engine rounds of path positions (alphas) to evaluate. Each node adds its gradient, times a
weight, to one or two accumulators ("slots"); a round may first rescale slots. The rule sees only scalars:
the target F and the directional derivative f = <dF/dx, x - x'> at each node, from which it decides the next
round. The engine owns the gradient tensors, so a rule's memory is a few numbers per node.

  FixedRule     one round: the nodes and weights of `path_coefficients(method, n_steps)`.
  AdaptiveRule  composite trapezoid on intervals graded towards both ends of the path, each interval halving
                its spacing on its own (a nested rule: every node, and every gradient, is kept) where its own
                completeness error, known exactly from F at its ends, is largest, until the completeness error
                of the whole path meets a tolerance.
"""
import functools
from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np
import torch

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
ADAPTIVE_METHOD = "adaptive_trapezoid"
ADAPTIVE_INTERVAL_BOUNDS = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 7 / 8, 15 / 16, 31 / 32, 1.0)
"""The adaptive rule's intervals, graded geometrically towards both ends, where path integrands of image
models vary fastest (bench/tolerance.py). Memory: one input-sized accumulator per interval."""
ADAPTIVE_MIN_STEPS = 2 * (len(ADAPTIVE_INTERVAL_BOUNDS) - 1) + 1
"""The adaptive rule's first two rounds: every interval's ends, then every midpoint (21 nodes)."""


class TooFewSteps(ValueError):
    """n_steps under what a fixed rule needs; `requirement` ("must be at least 2 for method riemann_trapezoid")
    lets a caller name the option or setting the count came from."""

    def __init__(self, requirement: str):
        super().__init__(f"n_steps {requirement}")
        self.requirement = requirement


def check_fixed_rule(method: str, n_steps: int) -> None:
    """ValueError unless `method` is a fixed rule, TooFewSteps unless n_steps is enough for it (riemann_trapezoid
    needs 2, the others 1)."""
    if method not in METHODS:
        raise ValueError(f"unknown integration method {method!r}; choose one of {', '.join(METHODS)}")
    least = 2 if method == "riemann_trapezoid" else 1
    if n_steps < least:
        raise TooFewSteps(f"must be at least {least} for method {method}")


@functools.lru_cache(maxsize=64)
def _legendre(n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [-1, 1], (n,) each, computed once per n: numpy's eigenvalue method holds
    an n x n companion matrix (20 MiB and 0.2 s at n = 1024)."""
    nodes, omegas = np.polynomial.legendre.leggauss(n_steps)
    nodes.flags.writeable = omegas.flags.writeable = False
    return nodes, omegas


def path_coefficients(method: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (alphas, weights), both float64 of shape (n_steps,), alphas ascending, weights summing to 1.

    gausslegendre: alpha_k = (1 + t_k) / 2 and w_k = omega_k / 2 for the Legendre nodes t_k and weights
    omega_k, so the endpoints are never sampled. riemann_left/right/middle: alpha_k = k/n, (k+1)/n,
    (k+1/2)/n with w_k = 1/n. riemann_trapezoid: alpha_k = k/(n-1) with weights h/2, h, ..., h, h/2 for
    h = 1/(n-1) (the true trapezoid rule; Captum's version weights 1/n and sums to 1 - 1/n).
    """
    check_fixed_rule(method, n_steps)
    k = np.arange(n_steps, dtype=np.float64)
    if method == "gausslegendre":
        nodes, omegas = _legendre(n_steps)
        alphas, weights = 0.5 * (1.0 + nodes), 0.5 * omegas
    elif method == "riemann_trapezoid":
        h = 1.0 / (n_steps - 1)
        alphas = k * h
        weights = np.full(n_steps, h)
        weights[[0, -1]] = h / 2
    else:
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
        alphas, weights = (k + offset) / n_steps, np.full(n_steps, 1.0 / n_steps)
    return torch.from_numpy(alphas), torch.from_numpy(weights)


@dataclass
class Round:
    """Nodes to evaluate next. alphas (m,) float64; slots, weights (m, 2): each node adds weight * gradient to
    up to two slots (weight 0 where unused); a node whose weights are all 0 is evaluated for F only.
    rescale: {slot: factor} applied to the slots before this round's gradients are added."""

    alphas: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    rescale: dict[int, float] = field(default_factory=dict)


@dataclass
class Refinement:
    """How a tolerance-driven integration ended."""

    tolerance: float
    max_steps: int
    tolerance_met: bool
    relative_error: float  # |sum(IG) - (F(x) - F(x'))| / |F(x) - F(x')|, from the rule's float64 sums
    segment_error: float  # sum over the rule's intervals of |T_i - (F(b_i) - F(a_i))|, over |F(x) - F(x')|: >= relative_error


class FixedRule:
    """`path_coefficients(method, n_steps)` in one round, plus the endpoints 0 and 1 (evaluated for F(x') and
    F(x), unweighted) where the rule itself does not sample them."""

    n_slots = 1
    refinement = None
    needs_derivatives = False

    def __init__(self, method: str, n_steps: int):
        self.method = method
        self.alphas, self.weights = path_coefficients(method, n_steps)
        self.endpoint_values: dict[float, float] = {}
        self._done = False

    def next_round(self) -> Optional[Round]:
        if self._done:
            return None
        self._done = True
        endpoints = [alpha for alpha in (0.0, 1.0) if not bool((self.alphas == alpha).any())]
        alphas = torch.cat([torch.tensor(endpoints, dtype=torch.float64), self.alphas])
        weights = torch.zeros(len(alphas), 2, dtype=torch.float64)
        weights[len(endpoints) :, 0] = self.weights
        return Round(alphas, torch.zeros(len(alphas), 2, dtype=torch.int64), weights)

    def absorb(self, alphas: torch.Tensor, targets: torch.Tensor, derivatives: torch.Tensor) -> None:
        for alpha, target in zip(alphas.tolist(), targets.tolist()):
            if alpha in (0.0, 1.0):
                self.endpoint_values[alpha] = target

    def final_rule(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alphas, self.weights


class AdaptiveRule:
    """Composite trapezoid over ADAPTIVE_INTERVAL_BOUNDS; interval i at level L has spacing |I_i| / 2^L and
    its own slot. Along the path dF/dalpha = f, so each interval's own completeness error is known exactly:
    e_i = T_i - (F(b_i) - F(a_i)), from F at its ends. After the ends and every midpoint (21 nodes; from the ends
    alone, effnet on coffee stops at 11 steps, 1.5% complete, with interval errors summing to 26%), a refinement
    round halves the spacing of the intervals whose |e_i| is at least a quarter of the largest: their slots are halved and the new midpoints added, so no
    node is ever evaluated twice. It stops when |sum_i e_i| = |sum T - (F(1) - F(0))| <= tolerance * |F(1) - F(0)|,
    or when no refinement fits in max_steps."""

    method = ADAPTIVE_METHOD
    needs_derivatives = True

    def __init__(self, tolerance: float, max_steps: int):
        self.tolerance, self.max_steps = tolerance, max_steps
        self.bounds = np.array(ADAPTIVE_INTERVAL_BOUNDS)
        self.n_slots = len(self.bounds) - 1
        self.levels = np.zeros(self.n_slots, dtype=np.int64)
        self.sums = np.zeros(self.n_slots)  # trapezoid sum of f at each interval's current level
        self.derivative_at: dict[float, float] = {}  # f at every node evaluated so far
        self.value_at: dict[float, float] = {}  # F at every node evaluated so far
        self.endpoint_values: dict[float, float] = {}
        self.n_nodes = 0
        self.refinement: Optional[Refinement] = None
        self._pending: Optional[list[int]] = None  # intervals refined by the round in flight (None: first round)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)

    def _trapezoid_sum(self, interval: int, level: int) -> float:
        a, length = self.bounds[interval], self.lengths[interval]
        f = [self.derivative_at[float(a + k * length / 2**level)] for k in range(2**level + 1)]
        return length / 2**level * (sum(f) - 0.5 * (f[0] + f[-1]))

    def next_round(self) -> Optional[Round]:
        if self._pending is None:  # the first round: the intervals' ends (level 0 everywhere)
            self._pending = list(range(self.n_slots))
            slots = np.zeros((len(self.bounds), 2), dtype=np.int64)
            weights = np.zeros((len(self.bounds), 2))
            for j in range(len(self.bounds)):  # an end adds to the interval on its left and on its right
                if j > 0:
                    slots[j, 0], weights[j, 0] = j - 1, self.lengths[j - 1] / 2
                if j < self.n_slots:
                    slots[j, 1], weights[j, 1] = j, self.lengths[j] / 2
            return Round(torch.from_numpy(self.bounds.copy()), torch.from_numpy(slots), torch.from_numpy(weights))
        if self._pending:
            self._finish_round()
        chosen = self._intervals_to_refine()
        if not chosen:
            return None
        alphas, slots, weights = [], [], []
        for i in chosen:
            new_level = self.levels[i] + 1
            spacing = self.lengths[i] / 2**new_level
            points = self.bounds[i] + spacing * (2 * np.arange(2 ** (new_level - 1)) + 1)
            alphas.append(points)
            slots.append(np.full(len(points), i))
            weights.append(np.full(len(points), spacing))
            self.levels[i] = new_level
        self._pending = chosen
        slot_pairs = np.stack([np.concatenate(slots), np.zeros(sum(map(len, slots)), dtype=np.int64)], axis=1)
        weight_pairs = np.stack([np.concatenate(weights), np.zeros(sum(map(len, weights)))], axis=1)
        return Round(torch.from_numpy(np.concatenate(alphas)), torch.from_numpy(slot_pairs), torch.from_numpy(weight_pairs), {i: 0.5 for i in chosen})

    def absorb(self, alphas: torch.Tensor, targets: torch.Tensor, derivatives: torch.Tensor) -> None:
        for alpha, target, derivative in zip(alphas.tolist(), targets.tolist(), derivatives.tolist()):
            self.derivative_at[alpha] = derivative
            self.value_at[alpha] = target
            if alpha in (0.0, 1.0):
                self.endpoint_values[alpha] = target
        self.n_nodes += len(alphas)

    def segment_errors(self) -> np.ndarray:
        """e_i = T_i - (F(b_i) - F(a_i)) for every interval, (n_slots,) float64: exact, up to F's rounding."""
        ends = np.array([self.value_at[float(bound)] for bound in self.bounds])
        return self.sums - np.diff(ends)

    def _finish_round(self) -> None:
        for i in self._pending:
            self.sums[i] = self._trapezoid_sum(i, self.levels[i])
        self._pending = []
        target = self.endpoint_values[1.0] - self.endpoint_values[0.0]
        errors = self.segment_errors()
        scale = abs(target) if target != 0 else 1.0
        met = abs(errors.sum()) <= self.tolerance * abs(target)
        self.refinement = Refinement(self.tolerance, self.max_steps, bool(met), abs(errors.sum()) / scale, float(np.abs(errors).sum()) / scale)

    def refinement_indicators(self) -> np.ndarray:
        """What decides which intervals are halved next, (n_slots,): |e_i|."""
        return np.abs(self.segment_errors())

    def _intervals_to_refine(self) -> list[int]:
        """Intervals to halve next: first all of them (every midpoint, so that no explanation rests on the 11 ends
        alone), then the largest indicators; [] when the tolerance is met or nothing fits."""
        unrefined = np.flatnonzero(self.levels == 0)
        if len(unrefined):
            return unrefined.tolist()
        return [] if self.refinement.tolerance_met else self._largest_indicators()

    def _largest_indicators(self) -> list[int]:
        """The intervals whose indicator is within a factor 4 of the largest, largest first, as many as fit."""
        indicators = self.refinement_indicators()
        chosen, budget = [], self.max_steps - self.n_nodes
        for i in np.argsort(-indicators, kind="stable"):
            if chosen and indicators[i] < indicators[chosen[0]] / 4:
                break
            cost = 2 ** int(self.levels[i])
            if cost <= budget:
                chosen.append(int(i))
                budget -= cost
        return chosen

    def final_rule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The composite trapezoid at the final levels: (alphas, weights), float64 (n,), alphas ascending."""
        weight_at: dict[float, float] = {}
        for i, (a, length, level) in enumerate(zip(self.bounds[:-1], self.lengths, self.levels)):
            spacing = length / 2**level
            for k in range(2**level + 1):
                alpha = float(a + k * spacing)
                weight_at[alpha] = weight_at.get(alpha, 0.0) + (spacing / 2 if k in (0, 2**level) else spacing)
        alphas = sorted(weight_at)
        return torch.tensor(alphas, dtype=torch.float64), torch.tensor([weight_at[a] for a in alphas], dtype=torch.float64)


@dataclass(frozen=True)
class RuleSpec:
    """The quadrature an explanation asks for, checked when made and never changed: `method` with n_steps, or
    with a tolerance the adaptive rule, refined up to max_steps nodes. make_rule(spec) gives a fresh rule."""

    method: str = "gausslegendre"
    n_steps: int = 50
    tolerance: Optional[float] = None
    max_steps: int = 257

    def __post_init__(self):
        if self.tolerance is None:
            check_fixed_rule(self.method, self.n_steps)
        elif self.max_steps < ADAPTIVE_MIN_STEPS:
            raise ValueError(f"max_steps must be at least {ADAPTIVE_MIN_STEPS} for the adaptive rule, got {self.max_steps}")

    @property
    def adaptive(self) -> bool:
        return self.tolerance is not None

    least_max_steps = ADAPTIVE_MIN_STEPS

    @property
    def most_steps(self) -> int:
        """The most path points the rule may use: max_steps of a tolerance, else n_steps."""
        return self.max_steps if self.adaptive else self.n_steps


class Rule(Protocol):
    """A quadrature rule being evaluated: the engine asks it for rounds of nodes and tells it F and f there."""

    method: str
    n_slots: int  # input-sized accumulators the engine keeps for it
    needs_derivatives: bool  # whether absorb() needs f = <dF/dx, x - x'> at the nodes
    endpoint_values: dict[float, float]  # F at alpha 0 and 1, once evaluated
    refinement: Optional[Refinement]

    def next_round(self) -> Optional[Round]: ...

    def absorb(self, alphas: torch.Tensor, targets: torch.Tensor, derivatives: Optional[torch.Tensor]) -> None: ...

    def final_rule(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def make_rule(spec: RuleSpec) -> Rule:
    """A fresh rule, not yet evaluated, for `spec`."""
    return AdaptiveRule(spec.tolerance, spec.max_steps) if spec.adaptive else FixedRule(spec.method, spec.n_steps)
