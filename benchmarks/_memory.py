"""Resident-memory helpers shared by the benchmarks (Linux ``/proc``; elsewhere they report
nothing): :func:`status` reads ``VmRSS``/``VmHWM`` in bytes, :func:`reset_peak` resets
``VmHWM`` so that a later read gives the peak of what ran in between."""
from __future__ import annotations


def status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident size; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
