"""Host-memory readings for the benchmarks (Linux ``/proc``): current and peak RSS, and resetting the peak."""

from __future__ import annotations


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``"VmRSS"``: resident now, ``"VmHWM"``: peak), ``None`` if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5); ``False`` where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
