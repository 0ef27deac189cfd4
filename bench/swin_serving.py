"""The swin archive on a CPU or a GPU: set-up cost of mmcv (fresh build vs cached install), prediction latency at
800x1333 and the cost of an explanation at the default number of steps.

    .venv/bin/python bench/swin_serving.py [--parts setup,predict,explain] [--repeats 3] [--device cpu|cuda]

setup:   tools/mmcv-wheel.sh into an empty temporary cache (the ~20-minute build a fresh machine does), then again
         from that cache after uninstalling mmcv (what every later set-up does); mmcv ends installed as before.
predict: a photo at 1333x800 through the staged archive's service (decode, mmdet's resize, detection, masks,
         gzip reply), exactly as a worker serves it; the weights are random in the seed fork's layout, converted.
explain: one explanation at the archive's default n_steps and internal_batch_size, with the time of one
         forward+backward path point, the completeness error, and the process's peak memory.
--device: where the service runs (default cuda when available, else cpu). On CUDA the same photo is also served on
         the CPU and the agreement of the two replies (scores, boxes, masks, labels) and of one path point's target
         and gradient is printed (the full explanation is not repeated on the CPU: it takes many minutes there).
Times are wall seconds (median of --repeats for predictions; on CUDA after synchronising) and CPU seconds (all
threads; on an otherwise idle 2-core machine wall is about CPU / 2): other processes on the machine inflate wall
times, not CPU times.
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

from devices import Stopwatch, add_device_argument, agreement, agreement_lines, peak_gpu_memory_gib, print_agreement
from timing import median, print_table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from checkpoint_files import write_swin_fork_checkpoint  # noqa: E402
from torchserve_harness import jpeg_bytes, shipped_model_config  # noqa: E402

from vision_attribution.archives import load_service  # noqa: E402
from vision_attribution.archives.build import stage_archive  # noqa: E402
from vision_attribution.formats.decode import decode_image_bytes  # noqa: E402
from vision_attribution.serving.jobs import IncomingRequest  # noqa: E402


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


def staged_service(workdir: Path, device: torch.device):
    """The archive staged as archive.sh stages it (checked by loading it on the CPU), loaded as a worker on `device`."""
    config = shipped_model_config("swin")
    checkpoint = write_swin_fork_checkpoint(workdir / "cascade_mask_rcnn_swin_tiny_patch4_window7.pth")
    stage_archive("swin", workdir, config, checkpoint, None, trust=False)
    return load_service(workdir, config, device), config


def path_point_gradient(service, photo: bytes) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(the explanation's target, F at the input, dF/dinput) of the top detection over threshold 0.05."""
    adapter = service.adapter
    model_input = adapter.prepare(decode_image_bytes(photo), {})
    plan = adapter.plan_explanation(model_input, {"threshold": 0.05})
    point = model_input.tensor.clone().requires_grad_(True)
    value = plan.path_target(point).sum()
    value.backward()
    return plan.target, value.detach(), point.grad


def read_reply(body: bytes) -> dict:
    with gzip.open(io.BytesIO(body)) as stream:
        return torch.load(io.BytesIO(stream.read()), weights_only=True)


def bench_serving(parts: set[str], repeats: int, device: torch.device) -> list[list[str]]:
    rows = []
    photo = jpeg_bytes(np.asarray(Image.fromarray(photos.astronaut()).resize((1333, 800))))
    on_gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="swin-bench-") as workdir:
        service, config = staged_service(Path(workdir), device)
        cpu_service = load_service(Path(workdir), config, torch.device("cpu")) if on_gpu else None
        settings = config["attribution"]
        if "predict" in parts:
            for threshold in ("0.5", "0.05"):
                walls, cpus, found = [], [], 0
                for _ in range(repeats):
                    with Stopwatch(device) as watch:
                        (reply,) = service.handle_batch([IncomingRequest(fields={"body": photo, "threshold": threshold})])
                    walls.append(watch.wall)
                    cpus.append(watch.cpu)
                    assert reply.status == 200, reply.body[:500]
                    found = len(read_reply(reply.body)["scores"])
                rows.append([f"predict 1333x800 photo, threshold {threshold}", f"{median(walls):.1f} s", f"{median(cpus):.1f} s", f"median of {repeats}; {found} detections with masks"])
            rows.append(["peak memory so far", f"{peak_rss_gib():.1f} GiB", "", "max RSS of this process"])
            if on_gpu:
                rows.append(["peak GPU memory so far", f"{peak_gpu_memory_gib(device):.1f} GiB", "", "torch.cuda.max_memory_allocated"])
                gpu_reply = read_reply(service.handle_batch([IncomingRequest(fields={"body": photo, "threshold": "0.05"})])[0].body)
                cpu_reply = read_reply(cpu_service.handle_batch([IncomingRequest(fields={"body": photo, "threshold": "0.05"})])[0].body)
                print_agreement(f"prediction at threshold 0.05 ({len(cpu_reply['scores'])} detections on the CPU, {len(gpu_reply['scores'])} on the GPU)",
                                agreement_lines(cpu_reply, gpu_reply))  # fmt: skip
        if "explain" in parts:
            with Stopwatch(device) as step:
                gpu_target, gpu_value, gpu_gradient = path_point_gradient(service, photo)
            rows.append(["one path point, forward + backward", f"{step.wall:.1f} s", f"{step.cpu:.1f} s", "a detection's score through backbone, neck, RoIAlign, 3 stages"])
            if on_gpu:
                cpu_target, cpu_value, cpu_gradient = path_point_gradient(cpu_service, photo)
                identity = lambda target: (target.get("kind"), target.get("index"), target.get("instance"))  # noqa: E731 - not the score
                same = "the same target" if identity(cpu_target) == identity(gpu_target) else f"different targets: CPU {cpu_target}, GPU {gpu_target}"
                print_agreement(f"one path point of the top detection ({same})",
                                [agreement("target F(x)", cpu_value, gpu_value), agreement("gradient dF/dx", cpu_gradient, gpu_gradient)])  # fmt: skip
            with Stopwatch(device) as explain:
                (reply,) = service.handle_batch([IncomingRequest(fields={"body": photo, "threshold": "0.05"}, explain=True)])
            assert reply.status == 200, reply.body[:500]
            result = read_reply(reply.body)
            span = abs(result["target_at_input"] - result["target_at_baseline"])
            rows.append([f"explain, default n_steps={settings['n_steps']}, internal_batch_size={settings['internal_batch_size']}", f"{explain.wall:.0f} s", f"{explain.cpu:.0f} s",
                         f"|delta| {abs(result['convergence_delta']):.3g} = {abs(result['convergence_delta']) / max(span, 1e-12):.1%} of |F(x) - F(x')| (random weights)"])  # fmt: skip
            rows.append(["peak memory", f"{peak_rss_gib():.1f} GiB", "", "max RSS of this process"])
            if on_gpu:
                rows.append(["peak GPU memory", f"{peak_gpu_memory_gib(device):.1f} GiB", "", "torch.cuda.max_memory_allocated"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="setup,predict,explain", help="comma-separated: setup, predict, explain")
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, device {args.device} ({where})", flush=True)
    rows = bench_setup() if "setup" in parts else []
    if parts & {"predict", "explain"}:
        rows += bench_serving(parts, args.repeats, args.device)
    print_table([f"swin on {where}", "wall", "CPU", "notes"], rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
