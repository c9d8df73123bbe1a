"""Interleaved, repeated timing: every candidate runs once per round, rounds rotate the order, medians win.

Interleaving spreads slow periods (other processes on a shared machine, frequency changes) over all
candidates instead of penalising whichever happened to run then.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import torch

from ..sysinfo import peak_rss_bytes


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    candidates: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    device: str,
    on_round: Callable[[], None] | None = None,
) -> dict[str, dict]:
    """{name: {"median_s", "times_s", "cpu_median_s"}} after ``warmup`` untimed and ``repeats`` timed rounds.

    ``cpu_median_s`` is the median CPU time of this process (all its threads) per call: on a shared CPU it
    barely moves when other processes compete for the cores, where wall-clock time does.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
        if on_round:
            on_round()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            candidates[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
        if on_round:
            on_round()
    return {
        name: {"median_s": statistics.median(ts), "times_s": ts, "cpu_median_s": statistics.median(cpu_times[name])}
        for name, ts in times.items()
    }


# ---- peak memory ----------------------------------------------------------------------------------------


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's allocator statistics, or Linux's peak-RSS mark (VmHWM) of this process."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass  # not Linux: the peak then includes loading, reported as such


def peak_memory(device: str) -> int:
    """Bytes: CUDA max_memory_allocated, or this process's peak resident set size since the last reset."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:  # Linux's VmHWM, which reset_peak_memory can lower; ru_maxrss (elsewhere) never goes down
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return peak_rss_bytes()
