"""Soak: the mixed load of tests/serving/test_reliability.py for a few minutes against one real TorchServe.

The server and its four archives are those of test_reliability.py (effnet and selfie with real weights, lanet and
tensormask small; one worker each, batching on). First every request of the load is sent alone: its reply is the
reference. Then CLIENTS threads send the requests in shuffled order without pause: `--warmup` seconds, a snapshot
of every worker's resident memory (VmRSS) and open file descriptors, `--duration` seconds more, a second snapshot.
An error is any reply that differs from its request's reference (status or content), a request that raised (every
request has a timeout), or a worker replaced during the run. Goals: 0 errors, RSS and descriptors within 5%.

    .venv/bin/python bench/soak.py [--duration 180 --warmup 45 --clients 16]
"""
import argparse
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_reliability import MODELS, RESPONSE_TIMEOUT, build_archives, concurrent_jobs, same_answer  # noqa: E402
from timing import print_table  # noqa: E402
from torchserve_harness import TorchServe  # noqa: E402


def process_usage(pid: int) -> tuple[float, int]:
    """(resident memory in MiB, open file descriptors) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(server: TorchServe) -> dict[str, tuple[int, float, int]]:
    """{"MODEL worker": (pid, RSS MiB, fds)} for every worker, plus the Java frontend."""
    usage = {}
    for model in MODELS:
        for index, pid in enumerate(server.worker_pids(model)):
            usage[f"{model} worker {index}"] = (pid, *process_usage(pid))
    for pid in server.process_ids():
        if Path(f"/proc/{pid}/comm").read_text().strip() == "java":
            usage["frontend (java)"] = (pid, *process_usage(pid))
    return usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180, help="seconds of load after the warm-up")
    parser.add_argument("--warmup", type=float, default=45, help="seconds of load before the first snapshot")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        workdir = Path(scratch)
        store = build_archives(workdir)
        with TorchServe(workdir, store, MODELS) as server:
            jobs = concurrent_jobs()
            send = lambda job: job.read(server.post(job.path, timeout=RESPONSE_TIMEOUT, **job.request))  # noqa: E731
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
                        answer = send(job)
                        error = None if same_answer(answer, references[job.name]) else f"{job.name}: reply differs from its reference"
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
                warm, warm_counts = snapshot(server), dict(counts)
                started = time.monotonic()
                time.sleep(args.duration)
                end, end_counts = snapshot(server), dict(counts)
                stop.set()
            elapsed = time.monotonic() - started

    requests_measured = end_counts["requests"] - warm_counts["requests"]
    replaced = [name for name in warm if name not in end or end[name][0] != warm[name][0]]
    print(f"soak: {args.clients} clients, {len(jobs)} distinct requests (predictions, explanations, bad requests; 4 archives)")
    print(f"warm-up {args.warmup:.0f} s ({warm_counts['requests']} requests), then {elapsed:.0f} s measured: {requests_measured} requests, "
          f"{requests_measured / elapsed:.2f} requests/s")
    print(f"errors: {counts['errors']} of {counts['requests']} requests (goal 0); workers replaced: {replaced or 'none'}")
    for error in errors[:10]:
        print(f"  {error}")
    rows = []
    for name, (pid, rss, fds) in warm.items():
        if name in end:
            _, rss_end, fds_end = end[name]
            rows.append([name, str(pid), f"{rss:.0f}", f"{rss_end:.0f}", f"{rss_end / rss:.3f}", str(fds), str(fds_end), f"{fds_end / fds:.3f}"])
    print_table(["process", "pid", "RSS warm MiB", "RSS end MiB", "RSS end/warm", "fds warm", "fds end", "fds end/warm"], rows)
    print("goal: end/warm < 1.05 for RSS and descriptors")


if __name__ == "__main__":
    main()
