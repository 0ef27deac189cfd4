"""Time and size of encoding a seed-format explanation reply: encode_gzip_torch (isal igzip level 1) vs gzip.

The reply is a real one: EfficientNet-lite0 (real weights) on skimage's coffee photo, 50 Gauss-Legendre
steps with keep_path=True, in the seed's keys and shapes (integrated_grads (1,3,224,224),
integrated_directional_grads and intermediates (50,3,224,224), step_sizes (50,1) float64, output (1,1000),
target_class). Every variant includes torch.save into memory; the anchor is what the seeds did,
gzip.compress(torch.save bytes, compresslevel=9). Rounds are interleaved; medians are shown. Each encoding is
checked to decode with gzip.open + torch.load to the same tensors.

    .venv/bin/python bench/payload_encoding.py [--repeats 7 --budget-s 120]
"""
import argparse
import gzip
import io

import torch
from skimage import data as photos

from timing import interleaved_times, median, print_table
from vision_attribution.formats.encode import encode_gzip_torch
from vision_attribution.attribution.engine import integrate_path
from vision_attribution.adapters.classifier import ClassifierAdapter
from vision_attribution.formats.class_names import imagenet_classes
from vision_attribution.networks.efficientnet_lite import INPUT_SIZE, MEAN, STD, load_efficientnet_lite0, packaged_weights

ANCHOR = "gzip.compress level 9 (seed)"


def seed_reply() -> dict:
    """The effnet seed reply dict of a real 50-step explanation."""
    device = torch.device("cpu")
    adapter = ClassifierAdapter(load_efficientnet_lite0(packaged_weights()).to(device), imagenet_classes(), INPUT_SIZE, MEAN, STD, device, resize_mode="center_crop")
    model_input = adapter.prepare(photos.coffee(), {})
    plan = adapter.plan_explanation(model_input, {})
    integral = integrate_path(
        plan.path_target, model_input.tensor, adapter.mean_input(model_input),
        n_steps=50, method="gausslegendre", internal_batch_size=10, keep_path=True,
    )  # fmt: skip
    return {
        "integrated_grads": integral.integrated_grads,
        "integrated_directional_grads": integral.path_gradients,
        "step_sizes": integral.step_sizes.unsqueeze(1),
        "intermediates": integral.intermediates,
        "output": plan.prediction["output"],
        "target_class": plan.prediction["target_class"],
    }


def torch_save_bytes(payload: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def seed_client_read(body: bytes) -> dict:
    with gzip.open(io.BytesIO(body), "rb") as stream:
        return torch.load(io.BytesIO(stream.read()))


def decodes_to(body: bytes, payload: dict) -> bool:
    decoded = seed_client_read(body)
    if decoded.keys() != payload.keys():
        return False
    return all(
        torch.equal(decoded[key], value) and decoded[key].dtype == value.dtype if isinstance(value, torch.Tensor) else decoded[key] == value
        for key, value in payload.items()
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="most interleaved rounds")
    parser.add_argument("--budget-s", type=float, default=120, help="stop starting rounds after this (3 rounds at least)")
    args = parser.parse_args()

    payload = seed_reply()
    encoders = {
        "encode_gzip_torch (isal igzip 1, ours)": encode_gzip_torch,
        ANCHOR: lambda reply: gzip.compress(torch_save_bytes(reply), compresslevel=9),
        "gzip.compress level 6": lambda reply: gzip.compress(torch_save_bytes(reply), compresslevel=6),
        "gzip.compress level 1 (zlib)": lambda reply: gzip.compress(torch_save_bytes(reply), compresslevel=1),
        "torch.save only (no compression)": torch_save_bytes,
    }
    bodies = {name: encode(payload) for name, encode in encoders.items()}
    checked = {name: decodes_to(body, payload) for name, body in bodies.items() if name != "torch.save only (no compression)"}
    raw_size = len(bodies["torch.save only (no compression)"])

    times = interleaved_times({name: (lambda encode=encode: encode(payload)) for name, encode in encoders.items()}, args.repeats, args.budget_s)
    anchor = median(times[ANCHOR])
    print(f"seed reply of a 50-step effnet explanation: {raw_size / 1e6:.1f} MB as torch.save; "
          f"{len(times[ANCHOR])} interleaved rounds after 1 warm-up round")
    rows = [
        [
            name, f"{median(values):.3f}", f"{min(values):.3f}", f"{len(bodies[name]) / 1e6:.2f}", f"{len(bodies[name]) / raw_size:.3f}",
            f"{anchor / median(values):.2f}", {True: "yes", False: "NO"}.get(checked.get(name), "-"),
        ]  # fmt: skip
        for name, values in times.items()
    ]
    print_table(["encoding (incl. torch.save)", "median s", "min s", "MB", "size / raw", "speedup vs gzip-9", "decodes equal"], rows)
    ours = median(times["encode_gzip_torch (isal igzip 1, ours)"])
    print(f"encode_gzip_torch speedup vs gzip.compress level 9: {anchor / ours:.2f}x (goal >= 4x); "
          f"size {len(bodies['encode_gzip_torch (isal igzip 1, ours)']) / len(bodies[ANCHOR]):.3f}x of gzip-9's")


if __name__ == "__main__":
    main()
