"""The attribution engine: one pass of path gradients gives IG, path gradients, IDG and the completeness delta.

For an input x, a baseline x' and a scalar target F, the straight path x_k = x' + alpha_k (x - x') is
sampled at the nodes of a quadrature rule (quadrature.py), the gradients g_k = dF/dx (x_k) are computed in
chunks of path points, and everything is derived from those gradients:

    IG        = (x - x') * sum_k w_k g_k
    IDG(S)    = sum_k w_k <g_k, z_S / |z_S|>,   z_S = (x - x') * 1_S   (Sikdar et al., 2021)
    dividend  = |IDG(S)| / sum_T |IDG(T)|
    delta     = F(x) - F(x') - sum(IG)

F(x) and F(x') are read off the path where the rule samples alpha = 1 and 0; otherwise (Gauss-Legendre) one
forward without gradients evaluates both, which costs less than two more rows of forward and backward. IDG is
linear in the gradients, so IDG(S) = sum(IG over S) / |z_S|: no second pass is ever needed. Memory is one
chunk plus one input-sized accumulator per slot of the rule, whatever the number of steps (unless the path is
kept). On the CPU, path points are laid out channels-last, which oneDNN's convolutions run faster.

A curved path (CurvedPath: Blur IG's scale space) gives its points x(alpha) and velocities dx/dalpha instead, and
then IG = sum_k w_k g_k * v_k, accumulated the same way (IDG is still taken along x - x' of its two ends). Guided
IG's path (guided_path.py) is decided step by step by the gradients: its problem brings one point to each chunk.

Several explanations whose targets share one model forward (PathTarget.forward, the same object) and one
input shape share chunks: a chunk holds at most the largest internal_batch_size among them (so memory is that
of one explanation), filled with the points of one after the other, and each result equals the one it gets alone.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Union

import torch

from .guided_path import GuidedPath, GuidedSpec
from .quadrature import Refinement, RuleSpec, make_rule

TargetFunction = Callable[[torch.Tensor], torch.Tensor]
"""Maps path points (b, C, H, W) to one differentiable scalar each, (b,)."""


@dataclass(frozen=True)
class PathTarget:
    """The explained scalar as a model forward and a readout: F(points) = readout(forward(points)).

    forward: points (b, C, H, W) -> model outputs whose first dimension is b; readout: those outputs -> (b,).
    Explanations whose targets have the same `forward` object may share forward/backward chunks."""

    forward: Callable[[torch.Tensor], Any]
    readout: Callable[[Any], torch.Tensor]

    @classmethod
    def of(cls, target_fn: Union[TargetFunction, "PathTarget"]) -> "PathTarget":
        """A target that shares its forward with no other: F = target_fn."""
        return target_fn if isinstance(target_fn, PathTarget) else cls(target_fn, _identity)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """F at path points (b, C, H, W) -> (b,)."""
        return self.readout(self.forward(points))


def _identity(outputs):
    return outputs


GUIDED_STEPS = "guided"
"""PathIntegral.method of Guided IG: n steps of 1/n of the L1 distance each, not a quadrature rule."""


class CurvedPath(Protocol):
    """A path other than the straight line, from x(0) (the problem's baseline) to x(1) (its inputs)."""

    def evaluate(self, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alphas (b,) float64 in [0, 1] -> points x(alpha) and velocities dx/dalpha, each (b, C, H, W)."""


@dataclass
class PathIntegral:
    """What one pass of path gradients gives for one input of shape (1, C, H, W); n = number of steps."""

    integrated_grads: torch.Tensor  # (1, C, H, W), dtype of the input
    alphas: torch.Tensor  # (n,) float64, path positions, ascending
    step_sizes: torch.Tensor  # (n,) float64, quadrature weights
    target_at_input: float  # F(x)
    target_at_baseline: float  # F(x')
    convergence_delta: float  # F(x) - F(x') - sum(IG)
    method: str = "gausslegendre"
    path_gradients: Optional[torch.Tensor] = None  # (n, C, H, W) float32 on CPU, row k = step k
    intermediates: Optional[torch.Tensor] = None  # (n, C, H, W) float32 on CPU, the path points x_k
    idg: Optional[torch.Tensor] = None  # (M,) float64, IDG per group
    idg_dividends: Optional[torch.Tensor] = None  # (M,) float64, sums to 1 unless every IDG is 0
    refinement: Optional[Refinement] = None  # how a tolerance-driven integration ended


@dataclass
class PathProblem:
    """One integral to compute. inputs, baseline: (1, C, H, W) on the model's device, the path's ends. rule: the
    quadrature, of which the engine makes a fresh rule for each computation, or Guided IG's steps (GuidedSpec). groups: boolean masks (M, H, W) or
    (M, 1|C, H, W) for IDG, or None. keep_path: also return the path gradients and points (memory then grows with
    the steps). path: a curved path between the two ends, or None for the straight one."""

    target: PathTarget
    inputs: torch.Tensor
    baseline: torch.Tensor
    rule: Union[RuleSpec, GuidedSpec]
    internal_batch_size: int = 16
    groups: Optional[torch.Tensor] = None
    keep_path: bool = False
    path: Optional[CurvedPath] = None  # None: the straight path from baseline to inputs

    def __post_init__(self):
        if self.inputs.dim() != 4 or self.inputs.shape[0] != 1 or self.baseline.shape != self.inputs.shape:
            raise ValueError(f"inputs and baseline must both be (1, C, H, W), got {tuple(self.inputs.shape)} and {tuple(self.baseline.shape)}")
        if self.internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be positive, got {self.internal_batch_size}")
        if isinstance(self.rule, GuidedSpec) and self.path is not None:
            raise ValueError("Guided IG decides its own path; a problem with a GuidedSpec rule takes no curved path")


def integrate_path(
    target_fn: Union[TargetFunction, PathTarget],
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    *,
    n_steps: int = 50,
    method: str = "gausslegendre",
    tolerance: Optional[float] = None,
    max_steps: int = 257,
    internal_batch_size: int = 16,
    groups: Optional[torch.Tensor] = None,
    keep_path: bool = False,
) -> PathIntegral:
    """Integrate the gradients of `target_fn` along the straight path from `baseline` to `inputs`.

    inputs, baseline: (1, C, H, W). With `tolerance`, the adaptive rule refines until the completeness
    error is at most tolerance * |F(x) - F(x')| or max_steps nodes are used; otherwise `method` with n_steps.
    """
    rule = RuleSpec(method, n_steps, tolerance, max_steps)
    problem = PathProblem(PathTarget.of(target_fn), inputs, baseline, rule, internal_batch_size, groups, keep_path)
    return integrate_paths([problem])[0]


class _Progress:
    """One problem's state while its rounds are evaluated."""

    def __init__(self, problem: PathProblem):
        self.problem = problem
        self.rule = make_rule(problem.rule)
        self.inputs, self.baseline = problem.inputs.detach(), problem.baseline.detach()
        self.difference = self.inputs - self.baseline
        self.slots = torch.zeros((self.rule.n_slots, *self.inputs.shape[1:]), dtype=self.inputs.dtype, device=self.inputs.device)
        self.kept: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self.velocities: dict[int, torch.Tensor] = {}  # a curved path's dx/dalpha of the rows in flight, by first row
        self.round = None
        self.next_row = 0
        self.unabsorbed = 0
        self._start_round()

    def _start_round(self) -> None:
        self.round = self.rule.next_round()
        self.next_row = 0
        if self.round is not None:
            for slot, factor in self.round.rescale.items():
                self.slots[slot] *= factor

    @property
    def pending(self) -> int:
        return 0 if self.round is None else len(self.round.alphas) - self.next_row

    @property
    def pending_evaluations(self) -> int:
        """Rows at the head of the pending ones that are evaluated for F only (their weights are all 0)."""
        if self.round is None:
            return 0
        weighted = (self.round.weights[self.next_row :] != 0).any(dim=1)
        return int(weighted.long().cumsum(0).eq(0).sum())

    def take(self, count: int) -> tuple[int, int]:
        rows = (self.next_row, self.next_row + count)
        self.next_row += count
        self.unabsorbed += count
        return rows

    def points(self, rows: tuple[int, int], gradients: bool = True) -> torch.Tensor:
        """(b, C, H, W) path points; alpha 0 and 1 give the baseline and the input exactly. On a curved path the
        rows' velocities are kept for absorb when their gradients will come."""
        if self.problem.path is not None:
            points, velocities = self.problem.path.evaluate(self.round.alphas[rows[0] : rows[1]])
            if gradients:
                self.velocities[rows[0]] = velocities
            return points
        alphas = self.round.alphas[rows[0] : rows[1]].to(self.inputs.device, self.inputs.dtype).view(-1, 1, 1, 1)
        points = self.baseline + alphas * self.difference
        return torch.where(alphas == 1, self.inputs, points)

    def absorb(self, rows: tuple[int, int], targets: torch.Tensor, gradients: Optional[torch.Tensor], points: torch.Tensor) -> None:
        """Add one chunk's gradients (b, C, H, W) to the slots (times dx/dalpha on a curved path) and tell the rule
        F (b,) and, where it asks, f = dF/dalpha = <g, x - x'> (b,); gradients is None for rows evaluated for F only."""
        start, stop = rows
        alphas = self.round.alphas[start:stop]
        derivatives = None
        if gradients is not None:
            integrand = gradients if self.problem.path is None else gradients * self.velocities.pop(start)
            slots, weights = self.round.slots[start:stop], self.round.weights[start:stop]
            for column in range(slots.shape[1]):
                if not bool(weights[:, column].any()):
                    continue
                for slot in slots[:, column].unique().tolist():
                    chunk_weights = torch.where(slots[:, column] == slot, weights[:, column], 0.0)
                    self.slots[slot] += torch.einsum("k,kchw->chw", chunk_weights.to(integrand.device, integrand.dtype), integrand)
            if self.rule.needs_derivatives and self.problem.path is not None:
                derivatives = integrand.double().sum(dim=(1, 2, 3)).cpu()
            elif self.rule.needs_derivatives:
                derivatives = torch.einsum("kchw,chw->k", gradients.double(), self.difference[0].double()).cpu()
            if self.problem.keep_path:
                for row in (weights != 0).any(dim=1).nonzero().flatten().tolist():
                    self.kept[float(alphas[row])] = (gradients[row].to("cpu", torch.float32).contiguous(), points[row].detach().to("cpu", torch.float32).contiguous())
        self.rule.absorb(alphas, targets.detach().double().cpu(), derivatives)
        self.unabsorbed -= stop - start
        if self.pending == 0 and self.unabsorbed == 0:
            self._start_round()

    def result(self) -> PathIntegral:
        rule = self.rule
        alphas, weights = rule.final_rule()
        integrated = self.slots.sum(0, keepdim=True).double()
        if self.problem.path is None:
            integrated = self.difference.double() * integrated
        integrated = integrated.to(self.inputs.dtype)
        target_at_input, target_at_baseline = rule.endpoint_values[1.0], rule.endpoint_values[0.0]
        result = PathIntegral(
            integrated_grads=integrated,
            alphas=alphas,
            step_sizes=weights,
            target_at_input=target_at_input,
            target_at_baseline=target_at_baseline,
            convergence_delta=target_at_input - target_at_baseline - float(integrated.double().sum()),  # as the reply recomputes it
            method=rule.method,
        )
        if rule.refinement is not None:  # the error the reply shows: from the IG tensor itself
            change = abs(target_at_input - target_at_baseline)
            met = abs(result.convergence_delta) <= rule.tolerance * change
            result.refinement = dataclasses.replace(rule.refinement, relative_error=abs(result.convergence_delta) / (change or 1.0), tolerance_met=met)
        if self.problem.keep_path:
            result.path_gradients = torch.stack([self.kept[float(alpha)][0] for alpha in alphas])
            result.intermediates = torch.stack([self.kept[float(alpha)][1] for alpha in alphas])
        if self.problem.groups is not None:
            result.idg, result.idg_dividends = integrated_directional_gradients(integrated, self.difference, self.problem.groups)
        return result


class _GuidedProgress:
    """One Guided IG problem's state: F at its two ends is evaluated first, then it brings one point to each chunk,
    the next decided by the gradient there (as _Progress, to _run_chunks). With a tolerance, a path that misses it
    is followed by one of twice the steps, up to max_steps."""

    def __init__(self, problem: PathProblem):
        self.problem, self.spec = problem, problem.rule
        self.inputs, self.baseline = problem.inputs.detach(), problem.baseline.detach()
        self.endpoint_values: dict[float, float] = {}
        self.ends_taken = False
        self._start_path(self.spec.first_steps)

    def _start_path(self, n_steps: int) -> None:
        self.path = GuidedPath(self.inputs, self.baseline, self.spec, n_steps)
        self.taken = 0
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def pending_evaluations(self) -> int:
        return 0 if self.ends_taken else 2

    @property
    def pending(self) -> int:
        """1 while steps remain and none is in flight: step k's point needs step k - 1's gradient."""
        return int(self.ends_taken and self.taken == self.path.steps_done < self.path.n_steps)

    def take(self, count: int) -> tuple[int, int]:
        if not self.ends_taken:
            self.ends_taken = True
            return (0, 2)
        self.taken += count
        return (self.taken - count, self.taken)

    def points(self, rows: tuple[int, int], gradients: bool = True) -> torch.Tensor:
        """The two ends (2, C, H, W) for F, or the next step's point (1, C, H, W)."""
        if not gradients:
            return torch.cat([self.baseline, self.inputs])
        return self.path.point.to(self.inputs.dtype)

    def absorb(self, rows: tuple[int, int], targets: torch.Tensor, gradients: Optional[torch.Tensor], points: torch.Tensor) -> None:
        if gradients is None:
            values = targets.detach().double().cpu().tolist()
            self.endpoint_values = {0.0: values[0], 1.0: values[1]}
            return
        if self.problem.keep_path:
            self.kept.append((gradients[0].to("cpu", torch.float32).contiguous(), points[0].detach().to("cpu", torch.float32).contiguous()))
        self.path.advance(gradients)
        path = self.path
        if self.spec.adaptive and path.steps_done == path.n_steps and 2 * path.n_steps <= self.spec.max_steps:
            if self._relative_error() > self.spec.tolerance:
                self._start_path(2 * path.n_steps)

    def _relative_error(self) -> float:
        change = self.endpoint_values[1.0] - self.endpoint_values[0.0]
        return abs(change - float(self.path.attribution.to(self.inputs.dtype).double().sum())) / (abs(change) or 1.0)

    def result(self) -> PathIntegral:
        """alphas k / n (the share of the L1 distance covered where gradient k was taken), step sizes 1 / n."""
        n = self.path.n_steps
        integrated = self.path.attribution.to(self.inputs.dtype)
        target_at_input, target_at_baseline = self.endpoint_values[1.0], self.endpoint_values[0.0]
        result = PathIntegral(
            integrated_grads=integrated,
            alphas=torch.arange(n, dtype=torch.float64) / n,
            step_sizes=torch.full((n,), 1.0 / n, dtype=torch.float64),
            target_at_input=target_at_input,
            target_at_baseline=target_at_baseline,
            convergence_delta=target_at_input - target_at_baseline - float(integrated.double().sum()),
            method=GUIDED_STEPS,
        )
        if self.spec.adaptive:  # one segment: the path's own error
            error = self._relative_error()
            result.refinement = Refinement(self.spec.tolerance, self.spec.max_steps, error <= self.spec.tolerance, error, error)
        if self.problem.keep_path:
            result.path_gradients = torch.stack([gradient for gradient, _ in self.kept])
            result.intermediates = torch.stack([point for _, point in self.kept])
        if self.problem.groups is not None:
            result.idg, result.idg_dividends = integrated_directional_gradients(integrated, self.inputs - self.baseline, self.problem.groups)
        return result


def integrate_paths(problems: list[PathProblem]) -> list[PathIntegral]:
    """Compute several integrals; problems with the same target forward and input shape share chunks."""
    states = [_GuidedProgress(problem) if isinstance(problem.rule, GuidedSpec) else _Progress(problem) for problem in problems]
    families: dict[tuple, list[_Progress]] = {}
    for state in states:
        key = (id(state.problem.target.forward), tuple(state.inputs.shape), state.inputs.dtype, state.inputs.device)
        families.setdefault(key, []).append(state)
    for family in families.values():
        _run_chunks(family)
    return [state.result() for state in states]


def _run_chunks(family: list["_Progress"]) -> None:
    """Evaluate chunks until every problem of the family is finished. Rows evaluated for F only go first, all
    problems' together, in one forward without gradients; then chunks of forward and backward hold at most the
    largest internal_batch_size of the active problems, each problem bringing up to its own."""
    forward = family[0].problem.target.forward
    while True:
        evaluations = [(state, state.take(state.pending_evaluations)) for state in family if state.pending_evaluations > 0]
        if evaluations:
            points = torch.cat([state.points(rows, gradients=False) for state, rows in evaluations])
            with torch.no_grad():
                targets = _readouts(evaluations, forward(points))
            for (state, rows), values in zip(evaluations, targets):
                state.absorb(rows, values, None, points)
            continue
        active = [state for state in family if state.pending > 0]
        if not active:
            return
        room, parts = max(state.problem.internal_batch_size for state in active), []
        for state in active:
            count = min(state.pending, state.problem.internal_batch_size, room)
            if count > 0:
                parts.append((state, state.take(count)))
                room -= count
        points = torch.cat([state.points(rows) for state, rows in parts])
        if points.device.type == "cpu":
            points = points.contiguous(memory_format=torch.channels_last)
        points.requires_grad_(True)
        with torch.enable_grad():
            targets = _readouts(parts, forward(points))
            (gradients,) = torch.autograd.grad(torch.cat(targets).sum(), points)
        start = 0
        for (state, rows), values in zip(parts, targets):
            count = rows[1] - rows[0]
            state.absorb(rows, values, gradients[start : start + count], points[start : start + count])
            start += count


def _readouts(parts: list, outputs) -> list[torch.Tensor]:
    """Each part's target values (count,) from the rows of the chunk's model outputs that are its own."""
    targets, start = [], 0
    for state, (first, stop) in parts:
        count = stop - first
        values = state.problem.target.readout(outputs[start : start + count] if len(parts) > 1 else outputs)
        if values.shape != (count,):
            raise ValueError(f"target function must return shape ({count},), got {tuple(values.shape)}")
        targets.append(values)
        start += count
    return targets


# Input-sized tensors the engine holds per problem beside the chunks, measured (peak RSS, 8 paths over 3 x 512 x 512):
GUIDED_STATE_TENSORS = 8  # float64: a GuidedPath's inputs, baseline, difference, point, attribution, and the result's casts
GUIDED_STEP_TENSORS = 8  # float64 temporaries of the Guided IG step in progress (one path at a time)
STRAIGHT_STATE_TENSORS = 9  # in the input's dtype: accumulators, difference, the result's float64 products, the two ends


def path_state_bytes(inputs: torch.Tensor, paths: int, guided: bool) -> int:
    """About how much memory `paths` problems over inputs (1, C, H, W) hold beside their chunks while integrated."""
    values = inputs[0].numel()
    if guided:
        return values * (8 * (GUIDED_STATE_TENSORS * paths + GUIDED_STEP_TENSORS) + 2 * inputs.element_size() * paths)  # + the ends
    return values * inputs.element_size() * STRAIGHT_STATE_TENSORS * paths


def integrated_directional_gradients(
    integrated_grads: torch.Tensor, difference: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IDG(S) = sum(IG over S) / |(x - x') * 1_S| for each group S, and the dividends |IDG| / sum |IDG|.

    integrated_grads, difference: (1, C, H, W). groups: boolean (M, H, W) or (M, 1|C, H, W).
    Returns two float64 tensors of shape (M,) on the CPU; a group with |z_S| = 0 gets IDG 0.
    """
    channels = difference.shape[1]
    masks = groups.to(difference.device)
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[1] not in (1, channels) or masks.shape[2:] != difference.shape[2:]:
        raise ValueError(f"groups must be (M, H, W) or (M, 1|{channels}, H, W) over a {tuple(difference.shape[2:])} input, got {tuple(groups.shape)}")
    masks = masks.double()
    ig, squared = integrated_grads[0].double(), difference[0].double() ** 2
    if masks.shape[1] == 1:
        ig, squared, masks = ig.sum(0), squared.sum(0), masks[:, 0]
        numerator = torch.einsum("mhw,hw->m", masks, ig)
        norm = torch.einsum("mhw,hw->m", masks, squared).sqrt()
    else:
        numerator = torch.einsum("mchw,chw->m", masks, ig)
        norm = torch.einsum("mchw,chw->m", masks, squared).sqrt()
    idg = torch.where(norm > 0, numerator / norm.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norm))
    total = idg.abs().sum()
    dividends = idg.abs() / total if total > 0 else torch.zeros_like(idg)
    return idg.cpu(), dividends.cpu()
