"""DEXTR serving on a CPU or a GPU: latency per request at the seed's 512x512 crop, and the Redis mode's round trip
vs direct HTTP.

A dextr archive is built by archive.sh from a whole pickled DextrModel (the published checkpoint's format, random
weights, crop 512, padding 10, sigma 10) and served by a real TorchServe (tests/torchserve_harness.py; 1 worker).
A real redis-server (tests/redis_harness.py) and `vision-attribution dextr-redis` sit in front of it.
Each round sends the same seed request (skimage's astronaut photo as base64 JPEG, four extreme points) once
directly (POST /predictions/dextr, JSON reply) and once through Redis (publish on the request channel, wait for the
reply on the reply channel), in alternating order; medians over the rounds and the Redis / HTTP ratio.
Two more rows time the network alone (in process, same crop) for context: a forward pass, and a forward + backward
pass of the object's summed logits, which is what one explanation path step costs (internal_batch_size 1).

--device (default cuda when available, else cpu): where TorchServe's worker and the in-process network run (cpu
sets TorchServe's number_of_gpu=0). On CUDA the CPU/GPU agreement is printed too: the network's logits, mask and
input gradient on the crop computed on both, and the mask the GPU worker served against the one computed on the CPU.

    .venv/bin/python bench/dextr_serving.py [--rounds 8] [--device cpu|cuda]
"""
import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as photos

from devices import add_device_argument, agreement, print_agreement, synchronize
from timing import interleaved_times, median, print_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dextr_data import write_pickled_dextr_model  # noqa: E402
from redis_harness import RedisServer  # noqa: E402
from torchserve_harness import TorchServe, build_archive, jpeg_bytes, shipped_model_config  # noqa: E402

from vision_attribution.formats.decode import decode_image_bytes  # noqa: E402
from vision_attribution.networks.dextr import CropSettings, load_network, network_input, paste_probability, read_checkpoint  # noqa: E402

POINTS = [[150, 30], [300, 200], [160, 500], [20, 300]]
CLIENT = str(Path(sys.executable).parent / "vision-attribution")


def logits_and_gradient(network: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop's logits and the gradient of their sum with respect to the input (one explanation path step)."""
    point = inputs.clone().requires_grad_(True)
    logits = network(point)["out"]
    (gradient,) = torch.autograd.grad(logits.sum(), point)
    return logits.detach(), gradient


def cpu_gpu_agreement(cpu_network: torch.nn.Module, network: torch.nn.Module, photo_jpeg: bytes, served_mask: np.ndarray) -> None:
    """The crop of the photo as the worker decodes it, through the network on the CPU and on the GPU; and the mask
    the GPU worker served against the one pasted from the CPU's probabilities (threshold 0.5, label 1)."""
    image = decode_image_bytes(photo_jpeg)
    inputs, box = network_input(image, np.asarray(POINTS, dtype=np.float64), CropSettings())
    cpu_logits, cpu_gradient = logits_and_gradient(cpu_network, inputs)
    device = next(network.parameters()).device
    gpu_logits, gpu_gradient = logits_and_gradient(network, inputs.to(device))
    cpu_probability = torch.sigmoid(cpu_logits[0, 0]).numpy()
    cpu_mask = paste_probability(cpu_probability, box, image.shape[:2]) / 255.0 >= 0.5
    print_agreement("DEXTR on the 512x512 crop", [
        agreement("logits", cpu_logits, gpu_logits),
        agreement("crop mask (probability >= 0.5)", cpu_logits >= 0, gpu_logits >= 0),
        agreement("input gradient of the summed logits", cpu_gradient, gpu_gradient),
        agreement("served mask (GPU worker) vs CPU mask", torch.from_numpy(cpu_mask), torch.from_numpy(served_mask)),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    add_device_argument(parser)
    args = parser.parse_args()
    device = args.device
    photo_jpeg = jpeg_bytes(photos.astronaut())
    request = {"image": base64.b64encode(photo_jpeg).decode(), "points": POINTS, "label": 1}

    with tempfile.TemporaryDirectory(prefix="dextr-bench-") as tmp:
        workdir = Path(tmp)
        checkpoint = write_pickled_dextr_model(workdir / "dextr_pascalvoc_resunet101-a2d81727.pth")
        state_dict = read_checkpoint(checkpoint, trust=True).state_dict
        network = load_network(state_dict).to(device)
        cpu_network = load_network(state_dict) if device.type == "cuda" else None
        inputs, _ = network_input(photos.astronaut(), np.asarray(POINTS, dtype=np.float64), CropSettings())
        inputs = inputs.to(device)

        def forward():
            with torch.no_grad():
                network(inputs)
            synchronize(device)

        def forward_backward():
            points = inputs.clone().requires_grad_(True)
            torch.autograd.grad(network(points)["out"].sum(), points)
            synchronize(device)

        store = workdir / "model_store"
        store.mkdir()
        build_archive("dextr", store, {**shipped_model_config("dextr"), "minWorkers": 1, "maxWorkers": 1}, checkpoint, ("--trust-checkpoint",))
        redis_server = RedisServer(workdir).start()
        gpus = {"number_of_gpu": "0"} if device.type == "cpu" else {}  # on CUDA TorchServe gives its worker a GPU
        with TorchServe(workdir, store, ["dextr"], extra_config=gpus) as server:
            bridge = subprocess.Popen(
                [CLIENT, "dextr-redis", "--redis_port", str(redis_server.port), "--redis_in", "dextr_in", "--redis_out", "dextr_out",
                 "--url", server.inference, "--token-file", str(workdir / "key_file.json")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            try:
                while dict(redis_server.client().pubsub_numsub("dextr_in")).get(b"dextr_in") != 1:
                    time.sleep(0.2)
                listener = redis_server.client().pubsub(ignore_subscribe_messages=True)
                listener.subscribe("dextr_out")
                sender = redis_server.client()

                def http():
                    reply = server.post("/predictions/dextr", json=request)
                    assert reply.status_code == 200, reply.text

                def through_redis():
                    sender.publish("dextr_in", json.dumps(request))
                    while (message := listener.get_message(timeout=600)) is None:
                        pass
                    assert "mask" in json.loads(message["data"]), message

                times = interleaved_times({"direct HTTP": http, "Redis round trip": through_redis, "forward pass only": forward, "forward + backward": forward_backward}, args.rounds)
                if cpu_network is not None:
                    served = server.post("/predictions/dextr", files={"image": photo_jpeg}, data={"points": json.dumps(POINTS)}, headers={"Accept": "image/png"})
                    assert served.status_code == 200, served.text
                    cpu_gpu_agreement(cpu_network, network, photo_jpeg, np.asarray(Image.open(io.BytesIO(served.content))) == 1)
            finally:
                os.killpg(bridge.pid, signal.SIGTERM)
                bridge.wait(timeout=60)
                redis_server.stop()

    http_median = median(times["direct HTTP"])
    rows = [[name, f"{median(values):.3f}", f"{min(values):.3f}", f"{median(values) / http_median:.3f}"] for name, values in times.items()]
    where = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"DEXTR ResNet-101 U-Net, 512x512 crop, {where}, {args.rounds} rounds, 512x512 JPEG request")
    print_table(["per request", "median s", "min s", "/ direct HTTP"], rows)


if __name__ == "__main__":
    main()
