"""Helpers shared by the benchmark scripts: interleaved timing with medians, and plain-text tables."""
import statistics
import time
from typing import Callable


def interleaved_times(
    variants: dict[str, Callable[[], object]], repeats: int, budget_s: float = float("inf"), min_repeats: int = 3
) -> dict[str, list[float]]:
    """Wall seconds of each variant after one untimed warm-up round. Every round runs all variants once, in
    an order rotated by one per round, so that load from other processes falls on every variant alike.
    Runs `repeats` rounds, or stops early (after at least `min_repeats`) once `budget_s` seconds are spent."""
    names = list(variants)
    for name in names:
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_index in range(repeats):
        if round_index >= min_repeats and time.perf_counter() - started > budget_s:
            break
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
