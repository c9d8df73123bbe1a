"""Facts about this process and machine, portable across Linux, macOS and Windows (psutil where it has them)."""

from __future__ import annotations

import platform
import sys

import psutil


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes.

    ``ru_maxrss`` is KiB on Linux but bytes on macOS; Windows has no ``resource`` module, and psutil's
    ``peak_wset`` is its peak working set."""
    if sys.platform == "win32":
        return int(psutil.Process().memory_info().peak_wset)
    import resource

    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def pid_alive(pid: int | None) -> bool:
    """A process with this pid exists and has not exited (a zombie nobody reaped yet counts as exited)."""
    if not pid:
        return False
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def cpu_name() -> str:
    """The CPU's model name where the OS tells it (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
