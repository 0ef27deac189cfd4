"""The swin archive on the CPU: set-up cost of mmcv (fresh build vs cached install), prediction latency at
800x1333 and the cost of an explanation at the default number of steps.

    .venv/bin/python bench/swin_serving.py [--parts setup,predict,explain] [--repeats 3]

setup:   tools/mmcv-wheel.sh into an empty temporary cache (the ~20-minute build a fresh machine does), then again
         from that cache after uninstalling mmcv (what every later set-up does); mmcv ends installed as before.
predict: a photo at 1333x800 through the staged archive's service (decode, mmdet's resize, detection, masks,
         gzip reply), exactly as a worker serves it; the weights are random in the seed fork's layout, converted.
explain: one explanation at the archive's default n_steps and internal_batch_size, with the time of one
         forward+backward path point, the completeness error, and the process's peak memory.
Times are wall seconds (median of --repeats for predictions) and CPU seconds (all threads; on an otherwise idle
2-core machine wall is about CPU / 2): other processes on the machine inflate wall times, not CPU times.
"""
import argparse
import gzip
import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as photos

from timing import median, print_table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from checkpoint_files import write_swin_fork_checkpoint  # noqa: E402
from torchserve_harness import jpeg_bytes, shipped_model_config  # noqa: E402

from vision_attribution.archives import load_service  # noqa: E402
from vision_attribution.archives.build import stage_archive  # noqa: E402
from vision_attribution.decode import decode_image_bytes  # noqa: E402
from vision_attribution.service import IncomingRequest  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(command: list[str], env: dict) -> tuple[float, float]:
    """(wall s, CPU s of the command and its children)."""
    start, cpu = time.perf_counter(), children_cpu_s()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, children_cpu_s() - cpu


class Stopwatch:
    """Wall and CPU seconds (this process's, all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bench_setup() -> list[list[str]]:
    python = str(REPO / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix="mmcv-cache-") as cache:
        env = dict(os.environ, VISION_ATTRIBUTION_CACHE=cache)
        print(f"building mmcv into the empty cache {cache} (about 20 minutes on 2 cores) ...", flush=True)
        subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "-y", "mmcv"], check=True)
        fresh, fresh_cpu = timed_run([str(REPO / "tools" / "mmcv-wheel.sh"), python], env)
        subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "-y", "mmcv"], check=True)
        cached, cached_cpu = timed_run([str(REPO / "tools" / "mmcv-wheel.sh"), python], env)
    subprocess.run([python, "-c", "import mmcv.ops"], check=True)
    return [
        ["mmcv set-up, fresh (sdist build)", f"{fresh:.0f} s", f"{fresh_cpu:.0f} s", ""],
        ["mmcv set-up, cached wheel", f"{cached:.1f} s", f"{cached_cpu:.1f} s", f"fresh / cached: {fresh / cached:.0f}x wall"],
    ]


def staged_service(workdir: Path):
    config = shipped_model_config("swin")
    checkpoint = write_swin_fork_checkpoint(workdir / "cascade_mask_rcnn_swin_tiny_patch4_window7.pth")
    stage_archive("swin", workdir, config, checkpoint, None, trust=False)
    return load_service(workdir, config, torch.device("cpu")), config


def read_reply(body: bytes) -> dict:
    with gzip.open(io.BytesIO(body)) as stream:
        return torch.load(io.BytesIO(stream.read()), weights_only=True)


def bench_serving(parts: set[str], repeats: int) -> list[list[str]]:
    rows = []
    photo = jpeg_bytes(np.asarray(Image.fromarray(photos.astronaut()).resize((1333, 800))))
    with tempfile.TemporaryDirectory(prefix="swin-bench-") as workdir:
        service, config = staged_service(Path(workdir))
        settings = config["attribution"]
        if "predict" in parts:
            for threshold in ("0.5", "0.05"):
                walls, cpus, found = [], [], 0
                for _ in range(repeats):
                    with Stopwatch() as watch:
                        (reply,) = service.handle_batch([IncomingRequest(fields={"body": photo, "threshold": threshold})])
                    walls.append(watch.wall)
                    cpus.append(watch.cpu)
                    assert reply.status == 200, reply.body[:500]
                    found = len(read_reply(reply.body)["scores"])
                rows.append([f"predict 1333x800 photo, threshold {threshold}", f"{median(walls):.1f} s", f"{median(cpus):.1f} s", f"median of {repeats}; {found} detections with masks"])
            rows.append(["peak memory so far", f"{peak_rss_gib():.1f} GiB", "", "max RSS of this process"])
        if "explain" in parts:
            adapter = service.adapter
            model_input = adapter.prepare(decode_image_bytes(photo), {})
            plan = adapter.plan_explanation(model_input, {"threshold": 0.05})
            point = model_input.tensor.clone().requires_grad_(True)
            with Stopwatch() as step:
                plan.path_target(point).sum().backward()
            rows.append(["one path point, forward + backward", f"{step.wall:.1f} s", f"{step.cpu:.1f} s", "a detection's score through backbone, neck, RoIAlign, 3 stages"])
            with Stopwatch() as explain:
                (reply,) = service.handle_batch([IncomingRequest(fields={"body": photo, "threshold": "0.05"}, explain=True)])
            assert reply.status == 200, reply.body[:500]
            result = read_reply(reply.body)
            span = abs(result["target_at_input"] - result["target_at_baseline"])
            rows.append([f"explain, default n_steps={settings['n_steps']}, internal_batch_size={settings['internal_batch_size']}", f"{explain.wall:.0f} s", f"{explain.cpu:.0f} s",
                         f"|delta| {abs(result['convergence_delta']):.3g} = {abs(result['convergence_delta']) / max(span, 1e-12):.1%} of |F(x) - F(x')| (random weights)"])  # fmt: skip
            rows.append(["peak memory", f"{peak_rss_gib():.1f} GiB", "", "max RSS of this process"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="setup,predict,explain", help="comma-separated: setup, predict, explain")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = bench_setup() if "setup" in parts else []
    if parts & {"predict", "explain"}:
        rows += bench_serving(parts, args.repeats)
    print_table(["swin on CPU", "wall", "CPU", "notes"], rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
