"""CPU time of one explanation on EfficientNet-lite0 (real weights, skimage's coffee photo): our engine vs Captum.

Variants, all on the same eval-mode model with frozen parameters, the same class logit (the predicted one),
50 Gauss-Legendre steps and internal_batch_size 10, timed interleaved and reported as medians:
  ours, keep_path=True   integrate_path: IG + path gradients + path points + 4x4-grid IDG + delta, one pass
  ours, keep_path=False  integrate_path: IG + 4x4-grid IDG + delta, one pass
  Captum IG (anchor)     captum.attr.IntegratedGradients.attribute alone
  seed method            Captum IG, then a second full pass of forward+backward over the same 50 path
                         points in chunks of 10 for the path gradients (what the seed handlers did)

Ratios are printed for medians and, as a check against load from other processes, for minima.

    .venv/bin/python bench/attribution_engine.py [--repeats 9 --budget-s 150]
"""
import argparse

import torch
from captum.attr import IntegratedGradients
from skimage import data as photos

from timing import interleaved_times, median, print_table
from vision_attribution.attribution.engine import integrate_path
from vision_attribution.adapters.classifier import ClassifierAdapter
from vision_attribution.formats.class_names import imagenet_classes
from vision_attribution.networks.efficientnet_lite import INPUT_SIZE, MEAN, STD, load_efficientnet_lite0, packaged_weights
from vision_attribution.attribution.quadrature import path_coefficients

N_STEPS = 50
METHOD = "gausslegendre"
INTERNAL_BATCH_SIZE = 10


def seed_path_gradients(model, inputs, baseline, class_index):
    """The seed's second pass: raw gradients (and points) at every path point, chunk by chunk."""
    alphas, _ = path_coefficients(METHOD, N_STEPS)
    gradients, points_kept = [], []
    for start in range(0, N_STEPS, INTERNAL_BATCH_SIZE):
        chunk = alphas[start : start + INTERNAL_BATCH_SIZE].to(inputs.dtype).view(-1, 1, 1, 1)
        points = (baseline + chunk * (inputs - baseline)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(points)[:, class_index].sum(), points)
        gradients.append(grad)
        points_kept.append(points.detach())
    return torch.cat(gradients), torch.cat(points_kept)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="most interleaved rounds")
    parser.add_argument("--budget-s", type=float, default=150, help="stop starting rounds after this (3 rounds at least)")
    args = parser.parse_args()

    device = torch.device("cpu")
    model = load_efficientnet_lite0(packaged_weights()).to(device)
    adapter = ClassifierAdapter(model, imagenet_classes(), INPUT_SIZE, MEAN, STD, device, resize_mode="center_crop", idg_grid=4)
    model_input = adapter.prepare(photos.coffee(), {})
    plan = adapter.plan_explanation(model_input, {})
    inputs, baseline = model_input.tensor, adapter.mean_input(model_input)
    class_index = plan.target["index"]
    captum_ig = IntegratedGradients(model)
    common = dict(n_steps=N_STEPS, method=METHOD, internal_batch_size=INTERNAL_BATCH_SIZE)

    def ours(keep_path):
        return integrate_path(plan.path_target, inputs, baseline, groups=plan.groups, keep_path=keep_path, **common)

    def captum():
        return captum_ig.attribute(inputs, baselines=baseline, target=class_index, **common)

    def seed():
        return captum(), seed_path_gradients(model, inputs, baseline, class_index)

    variants = {
        "ours, keep_path=True": lambda: ours(True),
        "ours, keep_path=False": lambda: ours(False),
        "Captum IG (anchor)": captum,
        "seed method (Captum IG + path pass)": seed,
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; effnet-lite0 on coffee, target "
          f"{plan.target['name']!r} (class {class_index}); {N_STEPS} steps {METHOD}, internal_batch_size "
          f"{INTERNAL_BATCH_SIZE}")
    times = interleaved_times(variants, args.repeats, args.budget_s)
    print(f"{len(times['Captum IG (anchor)'])} interleaved rounds after 1 warm-up round")
    anchor, anchor_min = median(times["Captum IG (anchor)"]), min(times["Captum IG (anchor)"])
    rows = [
        [name, f"{median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}", f"{median(values) / anchor:.3f}", f"{min(values) / anchor_min:.3f}"]
        for name, values in times.items()
    ]
    print_table(["variant", "median s", "min s", "max s", "median / Captum", "min / Captum"], rows)

    for statistic, pick in (("median", median), ("min", min)):
        ours_full, ours_lean = pick(times["ours, keep_path=True"]), pick(times["ours, keep_path=False"])
        captum_time, seed_time = pick(times["Captum IG (anchor)"]), pick(times["seed method (Captum IG + path pass)"])
        print(f"[{statistic}] ours(keep_path=True) / Captum IG: {ours_full / captum_time:.3f}x (goal <= 1.0x); "
              f"ours(keep_path=False) / Captum IG: {ours_lean / captum_time:.3f}x; "
              f"seed / ours(keep_path=True): {seed_time / ours_full:.2f}x (goal >= 1.9x)")

    result, reference = ours(True), captum()
    gradients, _ = seed_path_gradients(model, inputs, baseline, class_index)
    scale = float(reference.abs().max())
    print(f"check: max |IG ours - IG Captum| / max |IG| = {float((result.integrated_grads - reference).abs().max()) / scale:.2e}; "
          f"max |path grads ours - seed| = {float((result.path_gradients - gradients).abs().max()):.2e}; "
          f"delta = {result.convergence_delta:.4f} of F(x) - F(x') = {result.target_at_input - result.target_at_baseline:.4f}")


if __name__ == "__main__":
    main()
