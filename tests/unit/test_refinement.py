"""Explanations to a requested accuracy (the adaptive rule) and several explanations sharing chunks."""
import pytest
import torch

from test_engine import peak_rss_run
from vision_attribution.attribution.engine import PathProblem, PathTarget, integrate_path, integrate_paths
from vision_attribution.attribution.quadrature import ADAPTIVE_INTERVAL_BOUNDS, ADAPTIVE_MIN_STEPS, RuleSpec


class RidgeFunction:
    """F(x) = tanh(k (<w, x> - c)): its IG is known exactly,
    IG_i = (x_i - x'_i) w_i (F(x) - F(x')) / (<w, x> - <w, x'>), and the path integrand is one sharp step."""

    def __init__(self, shape, sharpness=60.0, offset=0.15, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.w = torch.rand(shape, generator=generator, dtype=torch.float64) / torch.tensor(shape).prod()
        self.sharpness, self.offset = sharpness, offset

    def __call__(self, points):
        return torch.tanh(self.sharpness * ((points * self.w).flatten(1).sum(1) - self.offset))

    def exact_ig(self, x, baseline):
        u1, u0 = float((x * self.w).sum()), float((baseline * self.w).sum())
        change = float(self(x) - self(baseline))
        return (x - baseline) * self.w * change / (u1 - u0)


def ridge_case():
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    return RidgeFunction(x.shape[1:]), x, torch.zeros_like(x)


@pytest.mark.parametrize("tolerance", [1e-2, 1e-3, 1e-5])
def test_the_error_bound_holds_against_the_exact_integral(tolerance):
    function, x, baseline = ridge_case()
    result = integrate_path(function, x, baseline, tolerance=tolerance, max_steps=1025, internal_batch_size=8)
    exact = function.exact_ig(x, baseline)
    change = result.target_at_input - result.target_at_baseline
    assert result.refinement.tolerance_met and result.method == "adaptive_trapezoid"
    assert abs(float(result.integrated_grads.sum()) - change) <= tolerance * abs(change)
    # One ridge: every feature's error is the same fraction of its exact value as the completeness error.
    assert torch.allclose(result.integrated_grads, exact, rtol=tolerance, atol=0)
    assert result.refinement.relative_error == pytest.approx(abs(result.convergence_delta) / abs(change), rel=1e-12)


def test_tighter_tolerances_take_more_steps_and_reuse_every_gradient():
    function, x, baseline = ridge_case()
    evaluated = []

    def recording(points):
        evaluated.append(points.detach()[:, 0, 0, 0].clone())
        return function(points)

    steps = []
    for tolerance in (1e-1, 1e-3, 1e-6):
        evaluated.clear()
        result = integrate_path(recording, x, baseline, tolerance=tolerance, max_steps=1025, internal_batch_size=8, keep_path=True)
        rows = torch.cat(evaluated)
        assert len(rows) == len(result.alphas)  # every evaluated point is a node of the final rule, F(x) and F(x') included
        assert len(torch.unique(rows)) == len(rows)  # no path point (so no gradient) twice
        assert torch.all(result.alphas[1:] > result.alphas[:-1]) and result.alphas[0] == 0 and result.alphas[-1] == 1
        assert float(result.step_sizes.sum()) == pytest.approx(1.0, abs=1e-15)
        weighted = (result.step_sizes.view(-1, 1, 1, 1) * result.path_gradients.double()).sum(0, keepdim=True)
        assert torch.allclose(result.integrated_grads, (x - baseline) * weighted, rtol=1e-5, atol=1e-9)
        steps.append(len(result.alphas))
    assert ADAPTIVE_MIN_STEPS <= steps[0] < steps[1] < steps[2]


def test_refinement_stops_at_max_steps_and_says_the_tolerance_was_not_met():
    function, x, baseline = ridge_case()
    result = integrate_path(function, x, baseline, tolerance=1e-12, max_steps=40, internal_batch_size=8)
    assert len(result.alphas) <= 40 and not result.refinement.tolerance_met
    assert result.refinement.relative_error > 1e-12 and result.refinement.max_steps == 40
    with pytest.raises(ValueError, match=f"max_steps must be at least {ADAPTIVE_MIN_STEPS}"):
        RuleSpec(tolerance=0.01, max_steps=ADAPTIVE_MIN_STEPS - 1)


def test_each_intervals_completeness_error_is_exact_and_drives_the_refinement():
    """Along the path dF/dalpha = f, so an interval's trapezoid sum misses F(b) - F(a) by exactly its quadrature
    error: segment_error is the sum of those misses, recomputed here from the reply's own nodes and F."""
    function, x, baseline = ridge_case()
    result = integrate_path(function, x, baseline, tolerance=1e-3, max_steps=1025, internal_batch_size=8, keep_path=True)
    difference = (x - baseline)[0]
    derivatives = torch.einsum("kchw,chw->k", result.path_gradients.double(), difference)
    values = function(baseline + result.alphas.view(-1, 1, 1, 1) * (x - baseline))
    misses = 0.0
    for a, b in zip(ADAPTIVE_INTERVAL_BOUNDS[:-1], ADAPTIVE_INTERVAL_BOUNDS[1:]):
        inside = (result.alphas >= a) & (result.alphas <= b)
        alphas, f = result.alphas[inside], derivatives[inside]
        trapezoid = float(((alphas[1:] - alphas[:-1]) * (f[1:] + f[:-1]) / 2).sum())
        misses += abs(trapezoid - float(values[inside][-1] - values[inside][0]))
    change = result.target_at_input - result.target_at_baseline
    assert result.refinement.segment_error == pytest.approx(misses / abs(change), rel=1e-4)
    assert result.refinement.relative_error <= result.refinement.segment_error


def test_refinement_goes_where_the_integrand_is_steep():
    function, x, baseline = ridge_case()  # tanh steps up at alpha ~ 0.30, over ~0.03
    result = integrate_path(function, x, baseline, tolerance=1e-6, max_steps=1025)
    steep = ((result.alphas > 0.25) & (result.alphas < 0.5)).sum()
    flat = ((result.alphas > 0.5) & (result.alphas < 0.75)).sum()
    assert steep > 10 * flat


@pytest.mark.slow
def test_memory_of_a_refinement_does_not_grow_with_its_steps():
    (few_steps, few_bytes), (many_steps, many_bytes) = peak_rss_run(64, "tolerance"), peak_rss_run(1024, "tolerance")
    assert few_steps <= 64 and many_steps > 700  # the tolerance is never met: both run to (about) max_steps
    # Measured here: ~110 MiB above the start at 64 steps, ~140 MiB at 1024, +-10 MiB from run to run (the allocator);
    # keeping the ~950 more gradients of 196 KiB would add ~180 MiB.
    assert int(many_bytes) - int(few_bytes) < 64 * 2**20


def small_segmenter() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Softplus(), torch.nn.Conv2d(8, 4, 3, padding=1),
    ).eval().requires_grad_(False)


def test_explanations_sharing_chunks_equal_each_alone():
    model = small_segmenter()
    calls = []

    def forward(points):
        calls.append(len(points))
        return model(points)

    generator = torch.Generator().manual_seed(3)
    images = [torch.rand(1, 3, 12, 12, generator=generator) for _ in range(4)]
    region = torch.zeros(12, 12)
    region[2:7, 3:9] = 1
    readouts = [lambda out: out[:, 1].mean(dim=(1, 2)), lambda out: (out[:, 2] * region).sum(dim=(1, 2)),
                lambda out: out[:, 0, 5, 5], lambda out: out[:, 3].amax(dim=(1, 2))]
    rules = [lambda: RuleSpec("gausslegendre", 9), lambda: RuleSpec("riemann_trapezoid", 7),
             lambda: RuleSpec(tolerance=1e-3, max_steps=129), lambda: RuleSpec("riemann_left", 5)]
    baselines = [torch.zeros_like(images[0]), torch.full_like(images[1], 0.5), torch.zeros_like(images[2]), torch.rand_like(images[3])]
    groups = torch.stack([region.bool(), ~region.bool()])

    def problems():
        return [PathProblem(PathTarget(forward, readout), image, baseline, rule(), internal_batch_size=3 + i, groups=groups, keep_path=i % 2 == 0)
                for i, (image, baseline, readout, rule) in enumerate(zip(images, baselines, readouts, rules))]

    alone = [integrate_paths([problem])[0] for problem in problems()]
    calls_alone = len(calls)
    calls.clear()
    together = integrate_paths(problems())
    assert len(calls) < calls_alone  # chunks were shared
    for single, shared in zip(alone, together):
        assert torch.allclose(shared.integrated_grads, single.integrated_grads, rtol=1e-6, atol=1e-7)
        assert torch.equal(shared.alphas, single.alphas) and torch.equal(shared.step_sizes, single.step_sizes)
        assert shared.target_at_input == pytest.approx(single.target_at_input, rel=1e-6)
        assert shared.convergence_delta == pytest.approx(single.convergence_delta, rel=1e-4, abs=1e-6)
        assert torch.allclose(shared.idg, single.idg, rtol=1e-6, atol=1e-9)
        if single.path_gradients is not None:
            assert torch.allclose(shared.path_gradients, single.path_gradients, rtol=1e-6, atol=1e-7)


def test_targets_with_their_own_forward_or_shape_do_not_share_chunks():
    model = small_segmenter()
    calls = []

    def forward(points):
        calls.append(tuple(points.shape))
        return model(points)

    readout = lambda out: out[:, 1].mean(dim=(1, 2))  # noqa: E731
    problems = [
        PathProblem(PathTarget(forward, readout), torch.rand(1, 3, 10, 10), torch.zeros(1, 3, 10, 10), RuleSpec("gausslegendre", 4)),
        PathProblem(PathTarget(forward, readout), torch.rand(1, 3, 14, 14), torch.zeros(1, 3, 14, 14), RuleSpec("gausslegendre", 4)),
    ]
    integrate_paths(problems)
    assert sorted(set(calls)) == [(2, 3, 10, 10), (2, 3, 14, 14), (4, 3, 10, 10), (4, 3, 14, 14)]
