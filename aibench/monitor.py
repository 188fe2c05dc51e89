"""CPU of every component, and whether the machine itself was saturated.

A component is a pid or a list of pids; its CPU includes every descendant process (a vLLM
server is an API process, an engine-core process and a worker), except for the load
generator, whose children are the systems under test.

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


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(roots: list[int], kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(kids.get(p, []))
    return out


def machine_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) over all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


class CpuMonitor:
    """Samples component CPU and machine load every ``interval`` seconds in a thread."""

    def __init__(self, pids: dict[str, int | list[int]], interval: float = 0.5, saturated_at: float = 0.9) -> None:
        self.pids = dict(pids)
        self.pids.setdefault("load-generator", os.getpid())
        self.interval = interval
        self.saturated_at = saturated_at
        self._start: dict[str, dict[int, float]] = {}
        self._end: dict[str, dict[int, float]] = {}
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = self.t1 = 0.0

    def __enter__(self) -> "CpuMonitor":
        self.t0 = time.monotonic()
        self._start = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.t1 = time.monotonic()
        self._end = self._sample()

    def _sample(self) -> dict[str, dict[int, float]]:
        kids = _children()
        out = {}
        for name, p in self.pids.items():
            roots = [p] if isinstance(p, int) else list(p)
            pids = roots if name == "load-generator" else tree(roots, kids)
            cpu = {q: v for q in pids if (v := proc_cpu_s(q)) is not None}
            if cpu:
                out[name] = cpu
        return out

    def _run(self) -> None:
        b0, t0 = machine_busy()
        while not self._stop.wait(self.interval):
            b1, t1 = machine_busy()
            if t1 > t0:
                self.samples.append((b1 - b0) / (t1 - t0))
            b0, t0 = b1, t1

    def report(self) -> dict:
        wall = max(self.t1 - self.t0, 1e-9)
        comps = {}
        for k, end in self._end.items():
            start = self._start.get(k, {})
            used = sum(v - start.get(q, 0.0) for q, v in end.items())
            comps[k] = {"cpu_s": round(used, 3), "cores": round(used / wall, 3), "processes": len(end)}
        busy = [s for s in self.samples]
        frac_saturated = sum(s >= self.saturated_at for s in busy) / len(busy) if busy else 0.0
        return {"components": comps, "machine_busy_mean": round(sum(busy) / len(busy), 3) if busy else None,
                "machine_saturated_fraction": round(frac_saturated, 3), "cpus": os.cpu_count(),
                "saturated": frac_saturated > 0.25}
