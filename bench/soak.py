"""Soak: a mixed load for minutes against one real TorchServe and the gateway in front of it.

The server holds six archives, built as the serving tests build them (tests/helpers/shared_torchserve.py): effnet and
selfie (real weights), lanet, tensormask, deeplab and dextr (checkpoints in the users' layouts), one worker each,
batching on where the archive batches. `vision-attribution gateway` serves MAX's routes (deeplab) and the tensormask
seed's port. The load is test_reliability.py's concurrent requests plus deeplab and dextr predictions and explanations,
MAX's predict, the tensormask seed's request and bad requests through the gateway.

First every request is sent alone: its reply is the reference. Then CLIENTS threads send the requests in shuffled
order without pause: `--warmup` seconds, then `--duration` seconds with a snapshot every `--every` seconds of every
process's resident memory (VmRSS), open sockets and other descriptors (each worker, the Java frontend, the gateway),
and the Java frontend's heap in use after a full collection (jcmd) after the warm-up and at the end. An error is any
reply that differs from its request's reference (status or content), a request that raised (every request has a
timeout), or a process replaced during the run. Goals: 0 errors, RSS within 5% after the warm-up, descriptors flat.

    .venv/bin/python bench/soak.py [--duration 900 --warmup 120 --clients 16 --every 60]
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from skimage import data as photos

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS / "helpers"), str(TESTS / "serving")]
from gateway_harness import Gateway  # noqa: E402
from replies import SEED_JSON  # noqa: E402
from shared_torchserve import SHARED_ARCHIVES  # noqa: E402
from test_reliability import RESPONSE_TIMEOUT, Job, concurrent_jobs, read_gzip, read_logits, same_answer  # noqa: E402
from timing import print_table  # noqa: E402
from torchserve_harness import TorchServe, free_port, jpeg_bytes  # noqa: E402

MODELS = ["effnet", "selfie", "lanet", "tensormask", "deeplab", "dextr"]
POINTS = [[20, 10], [80, 40], [45, 5], [40, 90]]


def read_max(reply: requests.Response):
    """MAX's reply: its seg_map as numbers, or the error."""
    return np.asarray(reply.json()["seg_map"], dtype=np.float32) if reply.status_code == 200 else json.dumps(reply.json())


def read_error_or_masks(reply: requests.Response):
    return read_gzip("pred_masks")(reply) if reply.status_code == 200 else json.dumps(reply.json())


def soak_jobs(gateway: Gateway) -> list[Job]:
    """test_reliability's concurrent load, then deeplab, dextr and the gateway's routes."""
    jobs = concurrent_jobs()
    coffee = jpeg_bytes(photos.coffee(), (96, 64))
    astronaut = jpeg_bytes(photos.astronaut(), (96, 96))
    dextr_form = {"files": {"image": astronaut}, "data": {"points": json.dumps(POINTS)}}
    jobs += [
        Job("deeplab predict", "/predictions/deeplab", {"files": {"image": coffee}, "data": {"image_size": "96"}, "headers": {"Accept": "application/gzip"}}, read_gzip("pred_masks")),
        Job("deeplab explain", "/explanations/deeplab", {"files": {"image": coffee}, "data": {"image_size": "64", "n_steps": "2"}}, read_gzip("integrated_grads")),
        Job("dextr predict", "/predictions/dextr", {**dextr_form, "headers": {"Accept": "application/gzip"}}, read_gzip("probability")),
        Job("dextr explain", "/explanations/dextr", {"files": dextr_form["files"], "data": {**dextr_form["data"], "n_steps": "2"}}, read_gzip("integrated_grads")),
        Job("dextr bad", "/predictions/dextr", {"files": {"image": astronaut}, "data": {"points": "[[1, 1]]"}}, read_logits),
        Job("gateway MAX predict", f"{gateway.url}/model/predict", {"files": {"image": coffee}, "data": {"image_size": "64", "type": "undefined"}}, read_max),
        Job("gateway MAX bad", f"{gateway.url}/model/predict", {"files": {"image": b"not an image"}}, read_max),
    ]
    seed_body = json.dumps({"img_data": photos.coffee()[::10, ::10, ::-1].transpose(2, 0, 1).tolist()})  # CHW BGR, 60 x 40
    seed_url = f"{gateway.seed_url('tensormask')}/model/"
    jobs += [
        Job("gateway tensormask seed", seed_url, {"data": seed_body, "headers": SEED_JSON}, read_error_or_masks),
        Job("gateway tensormask seed bad", seed_url, {"data": "{not json", "headers": SEED_JSON}, read_error_or_masks),
    ]
    return jobs


def process_usage(pid: int) -> tuple[float, int, int]:
    """(resident memory in MiB, open descriptors other than sockets, open sockets) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed while listed
    sockets = sum(target.startswith("socket:") for target in targets)
    return rss_kib / 1024, len(targets) - sockets, sockets


def java_live_heap_mib(pid: int) -> float:
    """The Java frontend's heap in use right after a full collection (jcmd GC.run, then GC.heap_info), MiB: what it
    holds on to, which its RSS (a heap that grows until a collection is due) does not show."""
    subprocess.run(["jcmd", str(pid), "GC.run"], check=True, capture_output=True, timeout=60)
    info = subprocess.run(["jcmd", str(pid), "GC.heap_info"], check=True, capture_output=True, text=True, timeout=60).stdout
    used = re.search(r"heap\s+total \d+K, used (\d+)K", info)
    return int(used.group(1)) / 1024 if used else float("nan")


def java_pid(server: TorchServe) -> int:
    return next(pid for pid in server.process_ids() if Path(f"/proc/{pid}/comm").read_text().strip() == "java")


def snapshot(server: TorchServe, gateway: Gateway) -> dict[str, tuple]:
    """{"PROCESS": (pid, RSS MiB, descriptors but sockets, sockets)} for every worker, the Java frontend and the gateway."""
    usage = {}
    for model in MODELS:
        for index, pid in enumerate(server.worker_pids(model)):
            usage[f"{model} worker {index}"] = (pid, *process_usage(pid))
    frontend = java_pid(server)
    usage["frontend (java)"] = (frontend, *process_usage(frontend))
    usage["gateway"] = (gateway.process.pid, *process_usage(gateway.process.pid))
    return usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=900, help="seconds of load after the warm-up")
    parser.add_argument("--warmup", type=float, default=120, help="seconds of load before the first snapshot")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--every", type=float, default=60, help="seconds between snapshots of the processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        workdir = Path(scratch)
        store = workdir / "model_store"
        store.mkdir()
        for name in MODELS:
            inputs = workdir / "inputs" / name
            inputs.mkdir(parents=True)
            SHARED_ARCHIVES[name](inputs, store)
        with TorchServe(workdir, store, MODELS) as server:
            gateway = Gateway(workdir, server.inference, workdir / "key_file.json", {"tensormask": free_port()})
            try:
                jobs = soak_jobs(gateway)

                def send(job: Job):
                    if job.path.startswith("http"):
                        return job.read(requests.post(job.path, timeout=RESPONSE_TIMEOUT, **job.request))
                    return job.read(server.post(job.path, timeout=RESPONSE_TIMEOUT, **job.request))

                references = {job.name: send(job) for job in jobs}
                counts = {"requests": 0, "errors": 0}
                errors: list[str] = []
                lock = threading.Lock()
                stop = threading.Event()

                def client(seed: int) -> None:
                    order = random.Random(seed)
                    while not stop.is_set():
                        job = order.choice(jobs)
                        try:
                            error = None if same_answer(send(job), references[job.name]) else f"{job.name}: reply differs from its reference"
                        except Exception as failure:  # noqa: BLE001 - every failure of a request is counted and reported
                            error = f"{job.name}: {type(failure).__name__}: {failure}"
                        with lock:
                            counts["requests"] += 1
                            if error:
                                counts["errors"] += 1
                                errors.append(error)

                with ThreadPoolExecutor(args.clients) as pool:
                    for seed in range(args.clients):
                        pool.submit(client, seed)
                    time.sleep(args.warmup)
                    heap_warm = java_live_heap_mib(java_pid(server))
                    snapshots, warm_counts = [snapshot(server, gateway)], dict(counts)
                    started = time.monotonic()
                    while time.monotonic() - started < args.duration:
                        time.sleep(min(args.every, args.duration - (time.monotonic() - started)))
                        snapshots.append(snapshot(server, gateway))
                    end_counts = dict(counts)
                    heap_end = java_live_heap_mib(java_pid(server))
                    stop.set()
                elapsed = time.monotonic() - started
            finally:
                gateway.stop()

    requests_measured = end_counts["requests"] - warm_counts["requests"]
    warm, middle, end = snapshots[0], snapshots[len(snapshots) // 2], snapshots[-1]
    replaced = [name for name in warm if name not in end or end[name][0] != warm[name][0]]
    print(f"soak: {args.clients} clients, {len(jobs)} distinct requests (predictions, explanations, bad requests; {len(MODELS)} archives and the gateway)")
    print(f"warm-up {args.warmup:.0f} s ({warm_counts['requests']} requests), then {elapsed:.0f} s measured: {requests_measured} requests, "
          f"{requests_measured / elapsed:.2f} requests/s; {len(snapshots)} snapshots, {args.every:.0f} s apart")
    print(f"errors: {counts['errors']} of {counts['requests']} requests (goal 0); processes replaced: {replaced or 'none'}")
    for error in errors[:10]:
        print(f"  {error}")
    rows = []
    for name, (pid, rss, fds, sockets) in warm.items():
        if name in end:
            rss_middle, (_, rss_end, fds_end, sockets_end) = middle[name][1], end[name]
            rows.append([name, str(pid), f"{rss:.0f}", f"{rss_middle:.0f}", f"{rss_end:.0f}", f"{rss_end / rss:.3f}", f"{rss_end / rss_middle:.3f}",
                         f"{fds} -> {fds_end}", f"{sockets} -> {sockets_end}"])  # fmt: skip
    print_table(["process", "pid", "RSS warm MiB", "RSS middle", "RSS end", "end/warm", "end/middle", "descriptors", "sockets"], rows)
    print("RSS MiB at each snapshot:")
    for name in warm:
        print(f"  {name}: " + " ".join(f"{snap[name][1]:.0f}" for snap in snapshots if name in snap))
    print(f"Java frontend's heap in use after a full collection: {heap_warm:.0f} MiB after the warm-up, {heap_end:.0f} MiB at the end")
    print("goal: end/warm < 1.05 for RSS; descriptors other than sockets unchanged (sockets follow the requests in flight)")


if __name__ == "__main__":
    main()
