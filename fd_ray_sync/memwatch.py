"""Private (anonymous) resident memory of this process, sampled in the background.

Object-store pages a process maps count as shared memory, not as its own; what a transfer
costs a process is the growth of its anonymous memory, so that is what is sampled.
"""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable


def memory_now() -> dict[str, int]:
    """Resident memory in bytes: total, anonymous (private), shared, and the process peak."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    return {
        "rss": fields.get("VmRSS", 0),
        "rss_anon": fields.get("RssAnon", 0),
        "rss_shared": fields.get("RssShmem", 0) + fields.get("RssFile", 0),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


class Peak:
    """Samples `read()` every `interval_s` in a thread; `stop()` gives the peak growth."""

    def __init__(self, read: Callable[[], int], interval_s: float):
        self.read, self.interval_s = read, interval_s
        self.base = self.peak = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        """Stop sampling; returns the peak growth in bytes."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())
        return self.peak - self.base


class AnonPeak(Peak):
    """Peak growth of this process's anonymous (private) RSS, sampled every 5 ms."""

    def __init__(self, interval_s: float = 0.005):
        super().__init__(lambda: memory_now()["rss_anon"], interval_s)
