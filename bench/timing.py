"""Helpers shared by the benchmark scripts: interleaved timing with medians, and plain-text tables."""
import statistics
import time
from typing import Callable


def interleaved_times(variants: dict[str, Callable[[], object]], repeats: int, warmups: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each variant, `repeats` times each; every round runs all variants once, in an order
    rotated by one per round, so that load from other processes falls on every variant alike."""
    names = list(variants)
    for _ in range(warmups):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(str(row[column])) for row in [headers, *rows]) for column in range(len(headers))]

    def line(cells):
        return "  ".join(str(cell).ljust(width) if column == 0 else str(cell).rjust(width) for column, (cell, width) in enumerate(zip(cells, widths)))

    print(line(headers))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))
