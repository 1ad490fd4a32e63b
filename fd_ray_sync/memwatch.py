"""Private (anonymous) resident memory of this process, sampled in the background.

Object-store pages a process maps count as shared memory, not as its own; what a transfer
costs a process is the growth of its anonymous memory, so that is what is sampled.
"""

from __future__ import annotations

import resource
import threading


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


class AnonPeak:
    """Samples anonymous RSS every `interval_s`; `peak_extra()` is the growth over the start."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.base = memory_now()["rss_anon"]
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, memory_now()["rss_anon"])

    def stop(self) -> int:
        """Stop sampling; returns the peak growth in bytes."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, memory_now()["rss_anon"])
        return self.peak - self.base
