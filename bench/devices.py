"""Helpers shared by the benchmark scripts that run on a chosen device: the --device option (CUDA when there is
one, else the CPU), synchronised timing, and how closely outputs computed on the CPU and on the GPU agree."""
import argparse
import time

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=default_device(), type=checked_device,
        help="where the model runs: cpu, cuda or cuda:N (default: cuda if available, else cpu); on CUDA the outputs are "
        "also computed on the CPU and their agreement printed",
    )  # fmt: skip


def checked_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device {name}: cpu or cuda[:N]")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall and CPU seconds (this process's, all threads) of a block; on CUDA the wall time includes the GPU's work."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info):
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def peak_gpu_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def agreement(name: str, on_cpu, on_gpu) -> str:
    """One line saying how two computations of the same output agree: booleans and integers by the fraction of
    elements that differ; floats by the largest absolute difference and the relative L2 error; shapes first."""
    cpu = torch.as_tensor(on_cpu).detach().cpu()
    gpu = torch.as_tensor(on_gpu).detach().cpu()
    if cpu.shape != gpu.shape:
        return f"{name}: shapes differ, CPU {tuple(cpu.shape)} vs GPU {tuple(gpu.shape)}"
    if cpu.numel() == 0:
        return f"{name}: empty on both"
    if not cpu.is_floating_point():
        differing = (cpu != gpu).double().mean().item()
        return f"{name}: {differing:.3%} of {cpu.numel()} elements differ"
    cpu, gpu = cpu.double(), gpu.double()
    largest = (cpu - gpu).abs().max().item()
    relative = ((cpu - gpu).norm() / cpu.norm().clamp_min(1e-30)).item()
    return f"{name}: max |CPU - GPU| {largest:.3g}, relative L2 error {relative:.3g}"


def agreement_lines(on_cpu: dict, on_gpu: dict) -> list[str]:
    """agreement() for every tensor both dicts hold (nested dicts flattened as a/b)."""
    lines = []
    for key in sorted(set(on_cpu) & set(on_gpu), key=str):
        cpu, gpu = on_cpu[key], on_gpu[key]
        if isinstance(cpu, dict) and isinstance(gpu, dict):
            lines += [f"{key}/{line}" for line in agreement_lines(cpu, gpu)]
        elif isinstance(cpu, torch.Tensor) and isinstance(gpu, torch.Tensor):
            lines.append(agreement(str(key), cpu, gpu))
    return lines


def print_agreement(title: str, lines: list[str]) -> None:
    print(f"\nCPU / GPU agreement, {title}:")
    for line in lines:
        print(f"  {line}")
