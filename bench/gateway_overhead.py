"""The gateway's cost, and DeepLab's CPU latency.

(a) Latency through `vision-attribution gateway` vs straight to TorchServe (with the token), on the same requests
    in one run, interleaved request by request (tests/torchserve_harness.py starts TorchServe; the gateway runs as
    its command): MAX's POST /model/predict at 513 (a 600x400 JPEG; direct: /predictions/deeplab with MAX's Accept
    type), the same at image_size 64 (a fast request, where overhead shows most), and the bit seed's POST /model/
    (a 60x40 image as the seed's JSON, 50-step explanation of a BiT R26x1). p50 and p99 per route, and the ratio
    gateway / direct (goal <= 1.1).
(b) deeplab predictions on the CPU at MAX's IMAGE_SIZE 513 (the 600x400 photo -> 513x342), mobile
    (deeplabv3_mobilenet_v3_large) and full (deeplabv3_resnet101), the service's whole request (decode, resize,
    forward, masks, MAX reply), torchvision's architecture with random weights (the speed does not depend on them).

    .venv/bin/python bench/gateway_overhead.py [--requests 30] [--seed-requests 8] [--rounds 5]
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image
from skimage import data as photos

from timing import interleaved_times, median, print_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoint_files import deeplab_torchvision, write_bit_checkpoint, write_deeplab_checkpoint  # noqa: E402
from torchserve_harness import TorchServe, build_archive, free_port, jpeg_bytes, shipped_model_config  # noqa: E402

from vision_attribution.adapters.longest_side import LongestSideSegmenterAdapter  # noqa: E402
from vision_attribution.formats.class_names import VOC_CLASSES  # noqa: E402
from vision_attribution.formats.seed_apis import MAX_PREDICTION_TYPE  # noqa: E402
from vision_attribution.networks.deeplab import MEAN, STD, load_deeplab  # noqa: E402
from vision_attribution.serving.jobs import IncomingRequest  # noqa: E402
from vision_attribution.serving.service import AttributionService  # noqa: E402
from vision_attribution.serving.settings import AttributionSettings  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def start_gateway(workdir: Path, torchserve: TorchServe, bit_port: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [str(Path(sys.executable).parent / "vision-attribution"), "gateway", "--torchserve", torchserve.inference,
               "--key-file", str(workdir / "key_file.json"), "--port", str(port), f"--seed=bit={bit_port}", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, stdout=open(workdir / "gateway.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(f"{url}/swagger.json", timeout=2).ok and requests.get(f"http://127.0.0.1:{bit_port}/swagger.json", timeout=2).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError((workdir / "gateway.log").read_text())


def overhead(requests_per_route: int, seed_requests: int) -> None:
    photo = jpeg_bytes(photos.coffee())
    seed_body = json.dumps({"img_data": np.asarray(Image.fromarray(photos.chelsea()).resize((60, 40))).tolist(), "target_class": "cat"}).encode()
    seed_headers = {"Content-Type": "application/json; chartset=utf-8"}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as directory:
        workdir = Path(directory)
        store = workdir / "model_store"
        store.mkdir()
        for name, checkpoint, options in (
            ("deeplab", write_deeplab_checkpoint(workdir, "mobile"), ["--model-type", "mobile"]),
            ("bit", write_bit_checkpoint(workdir / "bit.pth.tar"), []),
        ):
            config = shipped_model_config(name)
            config.update(minWorkers=1, maxWorkers=1)
            build_archive(name, store, config, checkpoint, options)
        with TorchServe(workdir, store, ["deeplab", "bit"]) as torchserve:
            bit_port = free_port()
            gateway, url = start_gateway(workdir, torchserve, bit_port)
            session = requests.Session()
            try:
                def through(path, **kwargs):
                    return lambda: check(session.post(f"{path}", timeout=300, **kwargs))

                def direct(path, headers=None, **kwargs):
                    return lambda: check(session.post(f"{torchserve.inference}{path}", headers={**torchserve.auth(), **(headers or {})}, timeout=300, **kwargs))

                routes = {
                    "MAX /model/predict, 513": (
                        through(f"{url}/model/predict", files={"image": ("coffee.jpg", photo, "image/jpeg")}),
                        direct("/predictions/deeplab", files={"image": ("coffee.jpg", photo, "image/jpeg")}, headers={"Accept": MAX_PREDICTION_TYPE}),
                    ),
                    "MAX /model/predict, image_size 64": (
                        through(f"{url}/model/predict", files={"image": ("coffee.jpg", photo, "image/jpeg")}, data={"image_size": "64"}),
                        direct("/predictions/deeplab", files={"image": ("coffee.jpg", photo, "image/jpeg")}, data={"image_size": "64"}, headers={"Accept": MAX_PREDICTION_TYPE}),
                    ),
                    "bit seed POST /model/ (explanation)": (
                        through(f"http://127.0.0.1:{bit_port}/model/", data=seed_body, headers=seed_headers),
                        direct("/explanations/bit", data=seed_body, headers=seed_headers),
                    ),
                }
                rows = []
                for route, (via_gateway, straight) in routes.items():
                    count = seed_requests if route.startswith("bit") else requests_per_route
                    times = interleaved_times({"gateway": via_gateway, "direct": straight}, count)
                    p50 = {name: percentile(values, 50) for name, values in times.items()}
                    p99 = {name: percentile(values, 99) for name, values in times.items()}
                    rows.append([f"{route} (n={count})", f"{p50['direct'] * 1e3:.1f}", f"{p50['gateway'] * 1e3:.1f}", f"{p50['gateway'] / p50['direct']:.3f}",
                                 f"{p99['direct'] * 1e3:.1f}", f"{p99['gateway'] * 1e3:.1f}", f"{p99['gateway'] / p99['direct']:.3f}"])  # fmt: skip
                print("(a) latency, n requests per route through each path, interleaved (ms)", flush=True)
                print_table(["route", "p50 direct", "p50 gateway", "ratio", "p99 direct", "p99 gateway", "ratio"], rows)
            finally:
                os.killpg(gateway.pid, signal.SIGTERM)
                gateway.wait(timeout=30)


def check(reply: requests.Response) -> requests.Response:
    if reply.status_code != 200:
        raise RuntimeError(f"{reply.status_code}: {reply.text[:500]}")
    return reply


def deeplab_latency(rounds: int) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    photo = jpeg_bytes(photos.coffee())
    rows = []
    for model_type in ("mobile", "full"):
        model = load_deeplab(deeplab_torchvision(model_type).state_dict(), model_type)
        service = AttributionService(LongestSideSegmenterAdapter(model, VOC_CLASSES, 513, MEAN, STD, torch.device("cpu")), AttributionSettings())
        request = lambda: service.handle_batch([IncomingRequest(fields={"body": photo}, headers={"Accept": MAX_PREDICTION_TYPE})])  # noqa: E731
        times = interleaved_times({model_type: request}, rounds)[model_type]
        rows.append([model_type, f"{median(times):.3f}", f"{min(times):.3f}", f"{max(times):.3f}"])
    print(f"(b) deeplab prediction on the CPU ({torch.get_num_threads()} threads), 600x400 JPEG -> 513x342, {rounds} rounds (s)")
    print_table(["model_type", "median", "min", "max"], rows)
    sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="requests per MAX route and path")
    parser.add_argument("--seed-requests", type=int, default=8, help="requests per path of the bit seed route (each a 50-step explanation)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    overhead(args.requests, args.seed_requests)
    deeplab_latency(args.rounds)
