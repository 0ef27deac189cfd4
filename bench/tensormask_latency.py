"""CPU latency of the TensorMask R50-FPN port with random weights.

Prints: detect() latency on one image and the share of it spent in SwapAlign2Nat; the
detectron2-style dense head (masks at every location of every level) and its SwapAlign2Nat
share; and the cost of N instance_score forward+backward passes at batch 1 (explain path).

    python bench/tensormask_latency.py [--height 800 --width 1333 --passes 20 --no-dense]
"""
import argparse
import time
from contextlib import contextmanager

import torch

from vision_attribution.networks.tensormask import TensorMask
from vision_attribution.networks.tensormask import head as head_module


class SwapAlign2NatTimer:
    """Accumulates wall time spent in the head's SwapAlign2Nat calls."""

    def __init__(self):
        self.seconds = 0.0

    @contextmanager
    def installed(self):
        originals = {name: getattr(head_module, name)
                     for name in ("swap_align2nat", "swap_align2nat_at_locations")}

        def timed(function):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
            return wrapper

        for name, function in originals.items():
            setattr(head_module, name, timed(function))
        try:
            yield self
        finally:
            for name, function in originals.items():
                setattr(head_module, name, function)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense head timing")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TensorMask().eval().requires_grad_(False)  # as load_tensormask returns it
    with torch.no_grad():
        # scores near 0.5 everywhere: the worst case, 100 detections with masks
        model.head.cls_score.bias.zero_()
    image = torch.rand(3, args.height, args.width) * 255
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"image {args.height}x{args.width}")

    model.detect(image[:, :64, :64], score_threshold=0.3)  # warm-up
    timer = SwapAlign2NatTimer()
    with timer.installed():
        start = time.perf_counter()
        result = model.detect(image, score_threshold=0.3)
        detect_s = time.perf_counter() - start
    print(f"detect: {detect_s:.2f} s, {len(result)} detections; SwapAlign2Nat "
          f"{timer.seconds:.2f} s ({100 * timer.seconds / detect_s:.1f}%)")

    if not args.no_dense:
        timer = SwapAlign2NatTimer()
        with timer.installed(), torch.no_grad():
            start = time.perf_counter()
            _, _, masks = model(image[None])
            dense_s = time.perf_counter() - start
        values = sum(m.numel() for level in masks for m in level)
        print(f"dense head forward (all masks, {values * 4 / 2**20:.0f} MiB of mask logits): "
              f"{dense_s:.2f} s; SwapAlign2Nat {timer.seconds:.2f} s "
              f"({100 * timer.seconds / dense_s:.1f}%)")
        del masks

    location = result.locations[0].tolist() if len(result) else [0, 10, 10, 0, 0]
    start = time.perf_counter()
    for _ in range(args.passes):
        images = image[None].clone().requires_grad_(True)
        score = model.instance_score(images, location)
        (grad,) = torch.autograd.grad(score.sum(), images)
    explain_s = time.perf_counter() - start
    print(f"instance_score forward+backward x{args.passes} at batch 1, location {location}: "
          f"{explain_s:.2f} s ({explain_s / args.passes:.2f} s per pass)")


if __name__ == "__main__":
    main()
