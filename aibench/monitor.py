"""CPU of every component, and whether the machine itself was saturated.

A benchmark whose load generator, gateway and simulated backends fight for the same cores
measures the machine, not the load balancer; the report says so instead of publishing a
meaningless number.
"""

from __future__ import annotations

import os
import threading
import time

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / _TICK  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def machine_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) over all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


class CpuMonitor:
    """Samples component CPU and machine load every ``interval`` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5, saturated_at: float = 0.9) -> None:
        self.pids = dict(pids)
        self.pids.setdefault("load-generator", os.getpid())
        self.interval = interval
        self.saturated_at = saturated_at
        self._start: dict[str, float] = {}
        self._end: dict[str, float] = {}
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = self.t1 = 0.0

    def __enter__(self) -> "CpuMonitor":
        self.t0 = time.monotonic()
        self._start = {k: v for k, p in self.pids.items() if (v := proc_cpu_s(p)) is not None}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.t1 = time.monotonic()
        self._end = {k: v for k, p in self.pids.items() if (v := proc_cpu_s(p)) is not None}

    def _run(self) -> None:
        b0, t0 = machine_busy()
        while not self._stop.wait(self.interval):
            b1, t1 = machine_busy()
            if t1 > t0:
                self.samples.append((b1 - b0) / (t1 - t0))
            b0, t0 = b1, t1

    def report(self) -> dict:
        wall = max(self.t1 - self.t0, 1e-9)
        comps = {k: {"cpu_s": round(self._end[k] - self._start[k], 3),
                     "cores": round((self._end[k] - self._start[k]) / wall, 3)}
                 for k in self._start if k in self._end}
        busy = [s for s in self.samples]
        frac_saturated = sum(s >= self.saturated_at for s in busy) / len(busy) if busy else 0.0
        return {"components": comps, "machine_busy_mean": round(sum(busy) / len(busy), 3) if busy else None,
                "machine_saturated_fraction": round(frac_saturated, 3), "cpus": os.cpu_count(),
                "saturated": frac_saturated > 0.25}
