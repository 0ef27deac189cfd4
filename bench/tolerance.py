"""Steps and wall time to reach 1% completeness error: tolerance mode (the adaptive rule) vs fixed Gauss-Legendre.

For each model, one explanation of its usual target on a photo that ships with scikit-image, on the CPU:
  effnet  EfficientNet-lite0, real ImageNet weights, coffee, the predicted class's logit
  selfie  MediaPipe selfie segmentation, real weights converted from the mediapipe wheel (needs PyPI once; random
          weights in the same layout with --no-download), astronaut, the person region's logit sum
  lanet   LaNet NetworkCIFAR(C=128, layers=24), random weights in the real layout, chelsea, the predicted class
Rows: tolerances 0.05, 0.02 and 0.01 (adaptive_trapezoid, max_steps as given) and fixed Gauss-Legendre at
50/100/200 steps, with the steps used, the relative completeness error |F(x) - F(x') - sum IG| / |F(x) - F(x')|,
whether it is within 1%, and wall seconds (median of --repeats). The last column is each row's time over the
tolerance 0.01 row's.

    .venv/bin/python bench/tolerance.py [--models effnet selfie lanet --repeats 3 --max-steps 513]
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from skimage import data as photos

from timing import interleaved_times, median, print_table
from vision_attribution.adapters.classifier import ClassifierAdapter
from vision_attribution.adapters.semantic import SemanticSegmenterAdapter
from vision_attribution.archives import selfie as selfie_archive
from vision_attribution.formats.class_names import CIFAR10_CLASSES, imagenet_classes
from vision_attribution.attribution.engine import integrate_path
from vision_attribution.networks.efficientnet_lite import INPUT_SIZE, MEAN, STD, load_efficientnet_lite0, packaged_weights
from vision_attribution.networks.lanet import LANET_NET_ENCODING, NetworkCIFAR, decode_lanet_encoding
from vision_attribution.networks.selfie import INPUT_SIZE as SELFIE_SIZE, SelfieSegmenter

CPU = torch.device("cpu")
TOLERANCE = 0.01
LOOSER_TOLERANCES = (0.05, 0.02)
FIXED_STEPS = (50, 100, 200)
INTERNAL_BATCH_SIZE = 16


def effnet():
    model = load_efficientnet_lite0(packaged_weights())
    return ClassifierAdapter(model, imagenet_classes(), INPUT_SIZE, MEAN, STD, CPU, resize_mode="center_crop"), photos.coffee()


def selfie(download: bool):
    network = SelfieSegmenter().eval().requires_grad_(False)
    if download:
        with tempfile.TemporaryDirectory() as workdir:
            weights = Path(workdir) / "selfie.pt"
            subprocess.run([sys.executable, "-m", "vision_attribution.archives.selfie_tflite", str(weights)], check=True, capture_output=True)
            network = selfie_archive.load_segmenter(weights)
    else:
        torch.manual_seed(0)

    def two_class_logits(images):
        half = network(images) / 2
        return torch.cat([-half, half], dim=1)

    return SemanticSegmenterAdapter(two_class_logits, selfie_archive.CLASS_NAMES, (SELFIE_SIZE, SELFIE_SIZE), (0, 0, 0), (1, 1, 1), CPU, binary=True), photos.astronaut()


def calibrated_lanet() -> NetworkCIFAR:
    """Random LaNet weights with BatchNorm statistics measured on random images: with the initial statistics
    (mean 0, variance 1) activations overflow through 24 cells and every output is NaN."""
    torch.manual_seed(0)
    network = NetworkCIFAR(128, 10, 24, True, decode_lanet_encoding(LANET_NET_ENCODING))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the calibration batches
    network.train()
    with torch.no_grad():
        for _ in range(2):
            network(torch.randn(16, 3, 32, 32))
    return network.eval().requires_grad_(False)


def lanet():
    network = calibrated_lanet()
    return ClassifierAdapter(lambda images: network(images)[0], CIFAR10_CLASSES, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CPU), photos.chelsea()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["effnet", "selfie", "lanet"], choices=["effnet", "selfie", "lanet"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=513, help="max_steps of the tolerance row")
    parser.add_argument("--no-download", action="store_true", help="selfie with random weights (no mediapipe wheel)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; internal_batch_size {INTERNAL_BATCH_SIZE}; zeros baseline")
    for name in args.models:
        adapter, photo = {"effnet": effnet, "selfie": lambda: selfie(not args.no_download), "lanet": lanet}[name]()
        model_input = adapter.prepare(photo, {})
        plan = adapter.plan_explanation(model_input, {})
        inputs, baseline = model_input.tensor, adapter.baseline(model_input, "zeros")
        variants = {f"tolerance {tolerance}": dict(tolerance=tolerance, max_steps=args.max_steps) for tolerance in (*LOOSER_TOLERANCES, TOLERANCE)}
        variants.update({f"gausslegendre {n}": dict(n_steps=n) for n in FIXED_STEPS})
        results = {label: integrate_path(plan.path_target, inputs, baseline, internal_batch_size=INTERNAL_BATCH_SIZE, **options) for label, options in variants.items()}
        times = interleaved_times(
            {label: (lambda options=options: integrate_path(plan.path_target, inputs, baseline, internal_batch_size=INTERNAL_BATCH_SIZE, **options))
             for label, options in variants.items()}, args.repeats, min_repeats=1,
        )
        anchor = median(times[f"tolerance {TOLERANCE}"])
        change = results[f"tolerance {TOLERANCE}"].target_at_input - results[f"tolerance {TOLERANCE}"].target_at_baseline
        print(f"\n{name}: target {plan.target['name']!r}, F(x) - F(x') = {change:.4f}")
        rows = []
        for label, result in results.items():
            error = abs(result.convergence_delta) / abs(change)
            rows.append([label, str(len(result.alphas)), f"{error:.4f}", "yes" if error <= TOLERANCE else "no", f"{median(times[label]):.2f}",
                         f"{median(times[label]) / anchor:.2f}"])
        print_table(["variant", "steps", "rel. error", "<= 1%", "wall s", "time / tolerance"], rows)


if __name__ == "__main__":
    main()
