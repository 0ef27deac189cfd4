"""Peak memory of integrate_path against n_steps at a fixed internal_batch_size, on EfficientNet-lite0.

Every measurement runs in a fresh subprocess that loads the model (real weights), prepares skimage's coffee
photo at 224x224 and runs one forward for the target class; the "baseline" subprocess stops there, the others
then run integrate_path (Gauss-Legendre, internal_batch_size 10, 4x4-grid IDG). Reported: ru_maxrss of each
subprocess and its increase over the baseline, and that increase relative to the 50-step one (goal for
keep_path=False: flat, about 1.0). ru_maxrss keeps the parent's peak across fork+exec; this parent never
imports torch, so that cannot mask the child's, and VmHWM (the child's own peak) is shown as a check. One keep_path=True row shows what storing the path costs. The rounds of
subprocesses are interleaved; medians over rounds are shown.

    .venv/bin/python bench/engine_memory.py [--rounds 2]
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from timing import print_table

INTERNAL_BATCH_SIZE = 10
CASES = [  # (label, n_steps, keep_path); n_steps None = the baseline subprocess
    ("baseline: model + one forward", None, False),
    ("50 steps, keep_path=False", 50, False),
    ("200 steps, keep_path=False", 200, False),
    ("800 steps, keep_path=False", 800, False),
    ("200 steps, keep_path=True", 200, True),
]


def measure_in_this_process(n_steps, keep_path):
    """Print {"maxrss_kib", "vmhwm_kib", "seconds"} as JSON; runs integrate_path unless n_steps is None."""
    import torch
    from skimage import data as photos

    from vision_attribution.attribution.engine import integrate_path
    from vision_attribution.adapters.classifier import ClassifierAdapter
    from vision_attribution.networks.efficientnet_lite import INPUT_SIZE, MEAN, STD, load_efficientnet_lite0, packaged_weights

    device = torch.device("cpu")
    model = load_efficientnet_lite0(packaged_weights()).to(device)
    adapter = ClassifierAdapter(model, [str(index) for index in range(1000)], INPUT_SIZE, MEAN, STD, device, resize_mode="center_crop")
    model_input = adapter.prepare(photos.coffee(), {})
    plan = adapter.plan_explanation(model_input, {})  # the one forward
    start = time.perf_counter()
    if n_steps is not None:
        integrate_path(
            plan.path_target, model_input.tensor, adapter.mean_input(model_input), n_steps=n_steps,
            method="gausslegendre", internal_batch_size=INTERNAL_BATCH_SIZE, groups=plan.groups, keep_path=keep_path,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    vmhwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kib": vmhwm_kib, "seconds": seconds}))


def measure_in_subprocess(n_steps, keep_path) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps([n_steps, keep_path])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="fresh subprocesses per case, interleaved")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure_in_this_process(*json.loads(args.child))
        return

    results = {label: [] for label, _, _ in CASES}
    for _ in range(args.rounds):
        for label, n_steps, keep_path in CASES:
            results[label].append(measure_in_subprocess(n_steps, keep_path))

    def median_of(label, key):
        return statistics.median(run[key] for run in results[label])

    baseline_mib = median_of(CASES[0][0], "maxrss_kib") / 1024
    reference_increase = median_of(CASES[1][0], "maxrss_kib") / 1024 - baseline_mib
    print(f"EfficientNet-lite0, 224x224, internal_batch_size {INTERNAL_BATCH_SIZE}, gausslegendre; "
          f"median of {args.rounds} fresh subprocesses per row")
    rows = []
    for label, n_steps, _ in CASES:
        peak_mib, own_peak_mib = median_of(label, "maxrss_kib") / 1024, median_of(label, "vmhwm_kib") / 1024
        all_runs = "/".join(f"{run['maxrss_kib'] / 1024:.0f}" for run in results[label])
        if n_steps is None:
            rows.append([label, f"{peak_mib:.0f}", all_runs, f"{own_peak_mib:.0f}", "-", "-", "-"])
            continue
        increase = peak_mib - baseline_mib
        rows.append([label, f"{peak_mib:.0f}", all_runs, f"{own_peak_mib:.0f}", f"{increase:.0f}", f"{increase / reference_increase:.2f}", f"{median_of(label, 'seconds'):.1f}"])
    print_table(["case", "ru_maxrss MiB", "runs MiB", "VmHWM MiB", "increase MiB", "increase / 50-step", "engine s"], rows)


if __name__ == "__main__":
    main()
