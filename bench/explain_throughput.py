"""Explanations per second under 16 concurrent clients: batchSize 8 (explanations share chunks) vs batchSize 1.

For each of lanet (NetworkCIFAR(C=128, layers=24), random weights in the real `{'model_state_dict'}` layout, as
`top1.pt`) and effnet (real weights), two archives that differ only in batchSize (8 vs 1; maxBatchDelay 100 ms,
one worker each) are served side by side by one real TorchServe (tests/torchserve_harness.py). Each round posts N
explanation requests (native JSON, different photos, the shipped config's internal_batch_size) from 16 client
threads to one archive, then the other, order alternating; explanations/second medians and the ratio are printed.
Replies of the batched archive are checked against the same request sent alone to the unbatched one (max
relative IG difference), so sharing chunks is shown not to change results.

    .venv/bin/python bench/explain_throughput.py [--models lanet effnet --requests 32 --rounds 2 --lanet-steps 8]
"""
import argparse
import base64
import gzip
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from skimage import data as photos

from timing import print_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from torchserve_harness import TorchServe, build_archive, jpeg_bytes, shipped_model_config  # noqa: E402
from tolerance import calibrated_lanet  # noqa: E402

CLIENT_THREADS = 16
BATCH_SIZES = (8, 1)
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "camera")


def lanet_checkpoint(workdir: Path) -> Path:
    network = calibrated_lanet()
    path = workdir / "top1.pt"
    torch.save({"model_state_dict": network.state_dict(), "epoch": 0}, path)
    return path


def build_archives(models: list[str], workdir: Path) -> Path:
    store = workdir / "model_store"
    store.mkdir()
    for model in models:
        checkpoint = lanet_checkpoint(workdir) if model == "lanet" else None
        for batch_size in BATCH_SIZES:
            out = workdir / f"build_{model}_b{batch_size}"
            out.mkdir()
            config = shipped_model_config(model)
            config.update(minWorkers=1, maxWorkers=1, batchSize=batch_size, maxBatchDelay=100, responseTimeout=3600)
            config["attribution"]["return_path"] = False
            shutil.move(build_archive(model, out, config, checkpoint=checkpoint), store / f"{model}_b{batch_size}.mar")
    return store


def request_bodies(n_steps: int) -> list[bytes]:
    images = [getattr(photos, name)() for name in PHOTOS]
    images = [image if image.ndim == 3 else image[..., None].repeat(3, axis=2) for image in images]
    return [json.dumps({"image": base64.b64encode(jpeg_bytes(image[..., :3], (160, 120))).decode(), "n_steps": n_steps}).encode() for image in images]


def integrated_grads(body: bytes) -> torch.Tensor:
    with gzip.open(io.BytesIO(body)) as stream:
        return torch.load(io.BytesIO(stream.read()), weights_only=True)["integrated_grads"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lanet", "effnet"], choices=["lanet", "effnet"])
    parser.add_argument("--requests", type=int, default=32, help="explanations per archive per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lanet-steps", type=int, default=8, help="n_steps of lanet requests (C=128 costs ~0.3 s per step on 2 cores)")
    parser.add_argument("--effnet-steps", type=int, default=50)
    args = parser.parse_args()
    print(f"torch {torch.__version__}; {CLIENT_THREADS} client threads; one worker per archive, maxBatchDelay 100 ms")
    with tempfile.TemporaryDirectory(prefix="explain-throughput-") as temp:
        workdir = Path(temp)
        store = build_archives(args.models, workdir)
        archives = [f"{model}_b{batch_size}" for model in args.models for batch_size in BATCH_SIZES]
        with TorchServe(workdir, store, archives) as server:
            for model in args.models:
                bodies = request_bodies(args.lanet_steps if model == "lanet" else args.effnet_steps)
                pair = [f"{model}_b{batch_size}" for batch_size in BATCH_SIZES]
                replies: dict[str, list] = {}

                def post(archive_and_body):
                    archive, body = archive_and_body
                    reply = server.post(f"/explanations/{archive}", data=body, headers={"Content-Type": "application/json"}, timeout=3600)
                    if reply.status_code != 200:
                        raise RuntimeError(f"{archive}: {reply.status_code} {reply.text[:200]}")
                    replies.setdefault(archive, []).append((body, reply.content))

                def rate(archive, count):
                    jobs = [(archive, bodies[i % len(bodies)]) for i in range(count)]
                    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
                        start = time.perf_counter()
                        list(pool.map(post, jobs))
                        return count / (time.perf_counter() - start)

                for archive in pair:
                    rate(archive, len(bodies))  # warm-up
                rates = {archive: [] for archive in pair}
                for round_index in range(args.rounds):
                    for archive in pair if round_index % 2 == 0 else pair[::-1]:
                        rates[archive].append(rate(archive, args.requests))
                alone = {body: integrated_grads(content) for body, content in replies[pair[1]]}
                difference = max(float((integrated_grads(content) - alone[body]).abs().max()) for body, content in replies[pair[0]])
                scale = max(float(values.abs().max()) for values in alone.values())
                anchor = statistics.median(rates[pair[1]])
                config = shipped_model_config(model)["attribution"]
                print(f"\n{model}: {args.requests} explanations per round ({args.lanet_steps if model == 'lanet' else args.effnet_steps} steps, "
                      f"internal_batch_size {config['internal_batch_size']}), {args.rounds} interleaved rounds after a warm-up")
                print_table(["archive", "median expl/s", "rounds", "/ batchSize 1"],
                            [[archive, f"{statistics.median(rates[archive]):.3f}", "/".join(f"{r:.3f}" for r in rates[archive]),
                              f"{statistics.median(rates[archive]) / anchor:.2f}"] for archive in pair])
                print(f"{model}: batchSize 8 / batchSize 1 = {statistics.median(rates[pair[0]]) / anchor:.2f}x; "
                      f"max |IG batched - IG alone| = {difference:.1e} (max |IG| {scale:.1e})")


if __name__ == "__main__":
    main()
