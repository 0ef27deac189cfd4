"""Selfie (MediaPipe selfie segmentation, real converted weights) on CPU: explain latency and serving throughput.

(a) Explain latency at 50 Gauss-Legendre steps, internal_batch_size 10, on skimage's astronaut photo, with the
    adapter loaded by archives.selfie.load_adapter from an extracted selfie archive: our integrate_path (IG + IDG per
    predicted segment + delta, keep_path=False as the archive serves by default) vs Captum IntegratedGradients
    on the same target function (the plan's person-region logit sum, (B,) per path point) - the anchor. One more
    row times the whole service explain request (JPEG decode, plan, engine, gzip reply) for context.
(b) Throughput of /predictions/{model} in a real TorchServe (tests/torchserve_harness.py) for two selfie archives
    whose model-configs differ only in batchSize (8 vs 1; maxBatchDelay 50 ms, minWorkers=maxWorkers=1 for both),
    served side by side from one TorchServe: each round posts N requests of a 256x256 JPEG from 16 client threads
    to one model, then the other (order alternating); requests/second medians and the batch-8 / batch-1 ratio.

    .venv/bin/python bench/selfie_serving.py [--requests 96 --rounds 3]
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from captum.attr import IntegratedGradients
from skimage import data as photos

from timing import interleaved_times, median, print_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from torchserve_harness import TorchServe, build_archive, jpeg_bytes, shipped_model_config  # noqa: E402

from vision_attribution.attribution.engine import integrate_path  # noqa: E402
from vision_attribution.archives.selfie import load_adapter  # noqa: E402
from vision_attribution.serving.jobs import IncomingRequest  # noqa: E402
from vision_attribution.serving.service import AttributionService  # noqa: E402
from vision_attribution.serving.settings import AttributionSettings  # noqa: E402

N_STEPS = 50
METHOD = "gausslegendre"
INTERNAL_BATCH_SIZE = 10
CLIENT_THREADS = 16
BATCH_SIZES = (8, 1)


def build_archives(workdir: Path) -> Path:
    """Convert the weights once, build one archive per batch size into workdir/model_store as selfie_b{N}.mar."""
    checkpoint = workdir / "selfie.pt"
    subprocess.run([sys.executable, "-m", "vision_attribution.archives.selfie_tflite", str(checkpoint)], check=True, capture_output=True)
    store = workdir / "model_store"
    store.mkdir()
    for batch_size in BATCH_SIZES:
        out = workdir / f"build_b{batch_size}"
        out.mkdir()
        config = shipped_model_config("selfie")
        config.update(minWorkers=1, maxWorkers=1, batchSize=batch_size, maxBatchDelay=50)
        archive = build_archive("selfie", out, config, checkpoint=checkpoint)
        shutil.move(archive, store / f"selfie_b{batch_size}.mar")
    return store


def explain_latency(store: Path, workdir: Path, repeats: int, budget_s: float) -> None:
    extracted = workdir / "extracted"
    with zipfile.ZipFile(store / f"selfie_b{BATCH_SIZES[0]}.mar") as archive:
        archive.extractall(extracted)
    device = torch.device("cpu")
    adapter = load_adapter(extracted, {}, device)
    photo = photos.astronaut()
    model_input = adapter.prepare(photo, {})
    plan = adapter.plan_explanation(model_input, {})
    inputs, baseline = model_input.tensor, adapter.mean_input(model_input)
    common = dict(n_steps=N_STEPS, method=METHOD, internal_batch_size=INTERNAL_BATCH_SIZE)
    captum_ig = IntegratedGradients(lambda points: plan.path_target(points))
    service = AttributionService(adapter, AttributionSettings(n_steps=N_STEPS, method=METHOD, internal_batch_size=INTERNAL_BATCH_SIZE, return_path=False))
    request = IncomingRequest(fields={"body": jpeg_bytes(photo)}, explain=True)

    def ours():
        return integrate_path(plan.path_target, inputs, baseline, groups=plan.groups, keep_path=False, **common)

    def captum():
        return captum_ig.attribute(inputs, baselines=baseline, **common)

    def service_explain():
        (reply,) = service.handle_batch([request])
        assert reply.status == 200, reply.body[:200]

    variants = {"ours: integrate_path, keep_path=False": ours, "Captum IG (anchor)": captum, "service explain request (JPEG -> gzip reply)": service_explain}
    times = interleaved_times(variants, repeats, budget_s)
    anchor, anchor_min = median(times["Captum IG (anchor)"]), min(times["Captum IG (anchor)"])
    print(f"(a) selfie explain, {N_STEPS} steps {METHOD}, internal_batch_size {INTERNAL_BATCH_SIZE}, target {plan.target['name']!r} "
          f"region ({plan.target['pixels']} px) on astronaut; {len(times['Captum IG (anchor)'])} interleaved rounds after 1 warm-up round")
    rows = [
        [name, f"{median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}", f"{median(values) / anchor:.3f}", f"{min(values) / anchor_min:.3f}"]
        for name, values in times.items()
    ]
    print_table(["variant", "median s", "min s", "max s", "median / Captum", "min / Captum"], rows)
    result, reference = ours(), captum()
    print(f"ours / Captum IG: {median(times['ours: integrate_path, keep_path=False']) / anchor:.3f}x (median); "
          f"check: max |IG ours - IG Captum| / max |IG| = {float((result.integrated_grads - reference).abs().max() / reference.abs().max()):.2e}, "
          f"delta {result.convergence_delta:.3f} of F(x) - F(x') = {result.target_at_input - result.target_at_baseline:.3f}")


def throughput(store: Path, workdir: Path, n_requests: int, rounds: int) -> None:
    models = [f"selfie_b{batch_size}" for batch_size in BATCH_SIZES]
    body = jpeg_bytes(photos.astronaut(), size=(256, 256))
    with TorchServe(workdir, store, models) as server:

        def post(model):
            reply = server.post(f"/predictions/{model}", data=body)
            if reply.status_code != 200:
                raise RuntimeError(f"{model}: {reply.status_code} {reply.text[:200]}")

        def requests_per_second(model, count):
            with ThreadPoolExecutor(CLIENT_THREADS) as pool:
                start = time.perf_counter()
                list(pool.map(post, [model] * count))
                return count / (time.perf_counter() - start)

        for model in models:
            requests_per_second(model, 2 * CLIENT_THREADS)  # warm-up
        rates = {model: [] for model in models}
        for round_index in range(rounds):
            for model in models if round_index % 2 == 0 else models[::-1]:
                rates[model].append(requests_per_second(model, n_requests))

    anchor = statistics.median(rates[models[-1]])
    print(f"(b) TorchServe /predictions, {n_requests} requests of a 256x256 JPEG ({len(body)} bytes) per round from "
          f"{CLIENT_THREADS} client threads, 1 worker each, maxBatchDelay 50 ms; {rounds} interleaved rounds after a warm-up")
    rows = [
        [f"batchSize {batch_size} ({model})", f"{statistics.median(rates[model]):.1f}", "/".join(f"{rate:.1f}" for rate in rates[model]), f"{statistics.median(rates[model]) / anchor:.2f}"]
        for batch_size, model in zip(BATCH_SIZES, models)
    ]
    print_table(["archive", "median req/s", "rounds req/s", "/ batchSize 1"], rows)
    print(f"batchSize 8 / batchSize 1 throughput: {statistics.median(rates[models[0]]) / anchor:.2f}x (goal >= 1.3x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="most interleaved rounds for (a)")
    parser.add_argument("--budget-s", type=float, default=40, help="(a) stops starting rounds after this (3 rounds at least)")
    parser.add_argument("--requests", type=int, default=96, help="requests per model per round in (b)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds in (b)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="selfie-bench-") as temp:
        workdir = Path(temp)
        store = build_archives(workdir)
        explain_latency(store, workdir, args.repeats, args.budget_s)
        throughput(store, workdir, args.requests, args.rounds)


if __name__ == "__main__":
    main()
