"""The attribution engine against Captum and against independent computations."""
import subprocess
import sys

import pytest
import torch
from captum.attr import IntegratedGradients

from vision_attribution.attribution.engine import integrate_path, integrated_directional_gradients
from vision_attribution.attribution.quadrature import path_coefficients


def small_classifier(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.Softplus(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    )
    return model.to(dtype).eval().requires_grad_(False)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
@pytest.mark.parametrize("n_steps", [7, 50])
def test_integrated_gradients_equal_captum(method, n_steps):
    model = small_classifier()
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    baseline = torch.zeros_like(x)
    ours = integrate_path(lambda p: model(p)[:, 3], x, baseline, n_steps=n_steps, method=method, internal_batch_size=4)
    theirs = IntegratedGradients(model).attribute(x, baseline, target=3, n_steps=n_steps, method=method, internal_batch_size=4)
    relative = (ours.integrated_grads - theirs).abs().max() / theirs.abs().max()
    assert relative < 1e-5


def test_quadrature_weights_sum_to_one_and_integrate_polynomials():
    for method in ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]:
        alphas, weights = path_coefficients(method, 40)
        assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert torch.all(alphas[1:] > alphas[:-1])
        assert abs(float((weights * alphas**2).sum()) - 1 / 3) < 2e-2
    alphas, weights = path_coefficients("gausslegendre", 5)  # exact up to degree 9
    assert abs(float((weights * alphas**9).sum()) - 0.1) < 1e-12
    assert 0 < alphas.min() and alphas.max() < 1
    with pytest.raises(ValueError, match="unknown integration method"):
        path_coefficients("simpson", 10)
    with pytest.raises(ValueError, match="n_steps"):
        path_coefficients("gausslegendre", 0)


def test_completeness_delta_is_small_on_a_smooth_model():
    model = small_classifier()
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    result = integrate_path(lambda p: model(p)[:, 1], x, torch.zeros_like(x), n_steps=32)
    expected = float(model(x)[0, 1] - model(torch.zeros_like(x))[0, 1])
    assert result.target_at_input - result.target_at_baseline == pytest.approx(expected, rel=1e-12)
    assert abs(result.convergence_delta) < 1e-8 * max(1.0, abs(expected))


def test_path_gradients_and_intermediates_are_step_major_and_exact():
    model = small_classifier()
    x, baseline = torch.rand(1, 3, 8, 8, dtype=torch.float64), torch.rand(1, 3, 8, 8, dtype=torch.float64)
    result = integrate_path(lambda p: model(p)[:, 0], x, baseline, n_steps=6, internal_batch_size=4, keep_path=True)
    assert result.path_gradients.shape == result.intermediates.shape == (6, 3, 8, 8)
    for k, alpha in enumerate(result.alphas):
        point = (baseline + alpha * (x - baseline)).requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(point)[0, 0], point)
        assert torch.allclose(result.intermediates[k].double(), point[0].detach(), atol=1e-6)
        assert torch.allclose(result.path_gradients[k].double(), gradient[0], atol=1e-6)
    weighted = (result.step_sizes.view(-1, 1, 1, 1) * result.path_gradients.double()).sum(0, keepdim=True)
    assert torch.allclose(result.integrated_grads, (x - baseline) * weighted, atol=1e-6)


def test_idg_equals_an_independent_sum_over_steps():
    model = small_classifier()
    x, baseline = torch.rand(1, 3, 10, 10, dtype=torch.float64), torch.zeros(1, 3, 10, 10, dtype=torch.float64)
    groups = torch.zeros(3, 10, 10, dtype=torch.bool)
    groups[0, :5], groups[1, 5:, :3], groups[2] = True, True, True
    result = integrate_path(lambda p: model(p)[:, 2], x, baseline, n_steps=9, groups=groups, keep_path=True)
    for index, mask in enumerate(groups):
        z = (x - baseline)[0] * mask
        direction = z / z.norm()
        expected = sum(w * (g.double() * direction).sum() for w, g in zip(result.step_sizes, result.path_gradients))
        assert float(result.idg[index]) == pytest.approx(float(expected), rel=1e-5)
    assert float(result.idg_dividends.sum()) == pytest.approx(1.0)
    assert torch.all(result.idg_dividends >= 0)


def test_idg_of_an_empty_group_is_zero_and_channel_masks_work():
    ig = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    difference = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    masks[1, 0] = True
    idg, dividends = integrated_directional_gradients(ig, difference, masks)
    assert idg[0] == 0 and dividends.tolist() == [0.0, 1.0]
    assert float(idg[1]) == pytest.approx(float(ig[0, 0].sum() / difference[0, 0].norm()))
    with pytest.raises(ValueError, match="groups must be"):
        integrated_directional_gradients(ig, difference, torch.ones(2, 5, 5, dtype=torch.bool))


PEAK_RSS_SCRIPT = """
import sys, torch
from vision_attribution.attribution.engine import integrate_path
from vision_attribution.attribution.quadrature import path_coefficients
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval().requires_grad_(False)
x = torch.rand(1, 3, 128, 128)
steps = dict(tolerance=1e-15, max_steps=int(sys.argv[1])) if sys.argv[2] == "tolerance" else dict(n_steps=int(sys.argv[1]))
if sys.argv[2] != "tolerance":
    path_coefficients("gausslegendre", int(sys.argv[1]))  # the rule's nodes, cached per n: not the path's memory
status = lambda field: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
start = status("VmRSS:")
result = integrate_path(lambda p: model(p)[:, 0], x, torch.zeros_like(x), internal_batch_size=8, keep_path=sys.argv[2] == "keep", **steps)
print(len(result.alphas), status("VmHWM:") - start)
"""


def peak_rss_run(n_steps: int, mode: str = "drop") -> tuple[int, int]:
    """(steps used, growth of the peak resident memory) of one integration in a fresh process (tensors of 196 KiB per
    path point), from just before it starts: the peak is reset there (clear_refs 5), so that the import's memory
    does not hide it, after the rule's Gauss-Legendre nodes are computed (they are cached per n; 20 MiB at n = 1024
    for a moment, which is the rule's, not the path's). mode: drop or keep the path, or "tolerance":
    an unreachable tolerance refined up to n_steps."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(n_steps), mode], capture_output=True, text=True, check=True)
    steps, peak = done.stdout.split()
    return int(steps), int(peak)


def peak_rss_bytes(n_steps: int, keep_path: bool = False) -> int:
    return peak_rss_run(n_steps, "keep" if keep_path else "drop")[1]


@pytest.mark.slow
def test_memory_per_chunk_does_not_depend_on_n_steps():
    few, many = peak_rss_bytes(64), peak_rss_bytes(1024)
    kept = peak_rss_bytes(512, keep_path=True)
    assert many - few < 32 * 2**20  # keeping 960 more path points of 196 KiB would add ~180 MiB per tensor
    assert kept - few > 150 * 2**20  # the measurement does see memory that grows with the steps


def test_target_function_must_return_one_scalar_per_point():
    model = small_classifier()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="target function must return"):
        integrate_path(lambda p: model(p), x, torch.zeros_like(x), n_steps=4)
