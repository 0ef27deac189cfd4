"""DEXTR serving on CPU: latency per request at the seed's 512x512 crop, and the Redis mode's round trip vs direct HTTP.

A dextr archive is built by archive.sh from a whole pickled DextrModel (the published checkpoint's format, random
weights, crop 512, padding 10, sigma 10) and served by a real TorchServe (tests/torchserve_harness.py; 1 worker).
A real redis-server (tests/redis_harness.py) and `vision-attribution dextr-redis` sit in front of it.
Each round sends the same seed request (skimage's astronaut photo as base64 JPEG, four extreme points) once
directly (POST /predictions/dextr, JSON reply) and once through Redis (publish on the request channel, wait for the
reply on the reply channel), in alternating order; medians over the rounds and the Redis / HTTP ratio.
Two more rows time the network alone (in process, same crop) for context: a forward pass, and a forward + backward
pass of the object's summed logits, which is what one explanation path step costs (internal_batch_size 1).

    .venv/bin/python bench/dextr_serving.py [--rounds 8]
"""
import argparse
import base64
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
from skimage import data as photos

from timing import interleaved_times, median, print_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dextr_data import write_pickled_dextr_model  # noqa: E402
from redis_harness import RedisServer  # noqa: E402
from torchserve_harness import TorchServe, build_archive, jpeg_bytes, shipped_model_config  # noqa: E402

from vision_attribution.networks.dextr import CropSettings, load_network, network_input, read_checkpoint  # noqa: E402

POINTS = [[150, 30], [300, 200], [160, 500], [20, 300]]
CLIENT = str(Path(sys.executable).parent / "vision-attribution")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    request = {"image": base64.b64encode(jpeg_bytes(photos.astronaut())).decode(), "points": POINTS, "label": 1}

    with tempfile.TemporaryDirectory(prefix="dextr-bench-") as tmp:
        workdir = Path(tmp)
        checkpoint = write_pickled_dextr_model(workdir / "dextr_pascalvoc_resunet101-a2d81727.pth")
        network = load_network(read_checkpoint(checkpoint, trust=True).state_dict)
        inputs, _ = network_input(photos.astronaut(), np.asarray(POINTS, dtype=np.float64), CropSettings())

        def forward():
            with torch.no_grad():
                network(inputs)

        def forward_backward():
            points = inputs.clone().requires_grad_(True)
            torch.autograd.grad(network(points)["out"].sum(), points)

        store = workdir / "model_store"
        store.mkdir()
        build_archive("dextr", store, {**shipped_model_config("dextr"), "minWorkers": 1, "maxWorkers": 1}, checkpoint, ("--trust-checkpoint",))
        redis_server = RedisServer(workdir).start()
        with TorchServe(workdir, store, ["dextr"]) as server:
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
            finally:
                os.killpg(bridge.pid, signal.SIGTERM)
                bridge.wait(timeout=60)
                redis_server.stop()

    http_median = median(times["direct HTTP"])
    rows = [[name, f"{median(values):.3f}", f"{min(values):.3f}", f"{median(values) / http_median:.3f}"] for name, values in times.items()]
    print(f"DEXTR ResNet-101 U-Net, 512x512 crop, CPU ({torch.get_num_threads()} threads), {args.rounds} rounds, 512x512 JPEG request")
    print_table(["per request", "median s", "min s", "/ direct HTTP"], rows)


if __name__ == "__main__":
    main()
