"""The backends every system is put in front of, and what the harness reads from them.

``SimFleet``: N simulated vLLM servers in one process, restarted for every system (empty
KV caches, zeroed counters). ``UserFleet`` (``--backend-urls``): your servers, which the
harness cannot restart; before every system it waits until they are idle and resets their
prefix caches (vLLM ``POST /reset_prefix_cache``, which vLLM serves only with
``VLLM_SERVER_DEV_MODE=1``; SGLang ``POST /flush_cache``), detecting per backend which
one works. When neither does, the report says so and marks the hit rate "carried over".

Everything read from a backend is what every vLLM or SGLang server has: ``/v1/models``
(model name, context length), ``/metrics`` (prefix-cache hits and queries, finished
requests, queue, the KV geometry in ``vllm:cache_config_info``).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .systems.api import Backends

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# family -> (hits, queries, finished requests, running, waiting) per metrics flavor
FLAVORS = {
    "vllm": ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:request_success_total",
             "vllm:num_requests_running", "vllm:num_requests_waiting"),
    "sglang": ("sglang:cached_tokens_total", "sglang:prompt_tokens_total", "sglang:num_requests_total",
               "sglang:num_running_reqs", "sglang:num_queue_reqs"),
}
RESET_HINT = {"vllm": "start vLLM with VLLM_SERVER_DEV_MODE=1 to serve POST /reset_prefix_cache"}


@dataclass
class Metrics:
    sums: dict[str, float] = field(default_factory=dict)
    info: dict[str, dict[str, str]] = field(default_factory=dict)  # *_info gauges: their labels

    @property
    def flavor(self) -> str:
        return "sglang" if any(k.startswith("sglang:") for k in self.sums) else "vllm"

    def get(self, what: int) -> float:
        return self.sums.get(FLAVORS[self.flavor][what], 0.0)


def parse_metrics(text: str) -> Metrics:
    """Prometheus text: each family summed over its label sets, plus the labels of *_info gauges."""
    m = Metrics()
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        g = _LINE.match(line)
        if not g:
            continue
        name, labels, value = g.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        m.sums[name] = m.sums.get(name, 0.0) + v
        if name.endswith("_info") and labels:
            m.info[name] = dict(_LABEL.findall(labels))
    return m


async def _get(s, url: str, timeout: float = 3.0) -> tuple[int, str]:
    import aiohttp

    try:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return 0, ""


async def _post(s, url: str, timeout: float = 10.0) -> tuple[int, str]:
    import aiohttp

    try:
        async with s.post(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return 0, ""


async def scrape(addresses: list[str]) -> dict[str, Metrics | None]:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        pages = await asyncio.gather(*(_get(s, f"http://{a}/metrics") for a in addresses))
    return {a: parse_metrics(t) if code == 200 else None for a, (code, t) in zip(addresses, pages)}


def counters(addresses: list[str]) -> dict:
    """Prefix-cache hits/queries (tokens) summed over the backends, finished requests per backend."""
    ms = asyncio.run(scrape(addresses))
    ok = {a: m for a, m in ms.items() if m is not None}
    return {"hits": sum(m.get(0) for m in ok.values()), "queries": sum(m.get(1) for m in ok.values()),
            "requests": {a: m.get(2) for a, m in ok.items()}, "unreachable": sorted(set(ms) - set(ok))}


@dataclass
class Probe:
    model: str | None = None
    max_model_len: int | None = None
    kv_tokens: int | None = None       # one server's KV capacity (the smallest), tokens
    block_size: int | None = None
    flavor: str = "vllm"
    reset: dict[str, str | None] = field(default_factory=dict)   # backend -> "vllm" | "sglang" | None
    reset_errors: dict[str, str] = field(default_factory=dict)


async def _reset_one(s, addr: str, method: str | None) -> tuple[str | None, str]:
    """Reset one backend's prefix cache; returns (method that worked, why not)."""
    why = []
    for m in ([method] if method else ["vllm", "sglang"]):
        path = "/reset_prefix_cache" if m == "vllm" else "/flush_cache"
        code, text = await _post(s, f"http://{addr}{path}")
        if code == 200 and '"success":false' not in text.replace(" ", ""):
            return m, ""
        why.append(f"POST {path}: " + (f"HTTP {code}" if code else "no answer")
                   + (" (blocks in use)" if '"success":false' in text.replace(" ", "") or code == 400 else ""))
    if any(w.startswith("POST /reset_prefix_cache: HTTP 404") for w in why):
        why.append(RESET_HINT["vllm"])
    return None, "; ".join(why)


async def _probe(addresses: list[str]) -> Probe:
    import aiohttp
    import json

    p = Probe()
    async with aiohttp.ClientSession() as s:
        code, body = await _get(s, f"http://{addresses[0]}/v1/models")
        if code == 200:
            try:
                d = json.loads(body)["data"][0]
                p.model, p.max_model_len = d.get("id"), d.get("max_model_len")
            except (ValueError, KeyError, IndexError, TypeError):
                pass
    ms = await scrape(addresses)
    kv = []
    for m in ms.values():
        if m is None:
            continue
        p.flavor = m.flavor
        info = m.info.get("vllm:cache_config_info", {})
        if info.get("num_gpu_blocks", "").isdigit() and info.get("block_size", "").isdigit():
            kv.append(int(info["num_gpu_blocks"]) * int(info["block_size"]))
            p.block_size = int(info["block_size"])
    p.kv_tokens = min(kv) if kv else None
    return p


def probe(addresses: list[str]) -> Probe:
    return asyncio.run(_probe(addresses))


async def _idle(addresses: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        ms = await scrape(addresses)
        if all(m is None or (m.get(3) == 0 and m.get(4) == 0) for m in ms.values()):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.25)


async def _reset_all(addresses: list[str], methods: dict[str, str | None], timeout: float) -> dict:
    import aiohttp

    await _idle(addresses, timeout)
    deadline = time.monotonic() + timeout
    done: dict[str, str] = {}
    why: dict[str, str] = {}
    async with aiohttp.ClientSession() as s:
        while True:
            todo = [a for a in addresses if a not in done and (a not in methods or methods[a])]
            outs = await asyncio.gather(*(_reset_one(s, a, methods.get(a)) for a in todo))
            for a, (m, w) in zip(todo, outs):
                if m:
                    done[a] = m
                    methods[a] = m
                else:
                    why[a] = w
            left = [a for a in todo if a not in done]
            if not left or time.monotonic() > deadline or not any("in use" in why[a] for a in left):
                break
            await asyncio.sleep(0.5)  # blocks still held by the previous system's last requests
    for a in addresses:
        if a not in done and a not in methods:
            methods[a] = None  # neither endpoint exists: do not ask again
    failed = {a: why.get(a, "no reset endpoint") for a in addresses if a not in done}
    return {"state": "reset" if not failed else "carried over", "methods": sorted(set(done.values())),
            "reset": len(done), "backends": len(addresses), "failed": failed}


def local_pids(addresses: list[str]) -> dict[str, int]:
    """Backend address -> pid of the local process listening there (Linux /proc), for the
    backends that run on this machine."""
    want: dict[int, str] = {}
    for a in addresses:
        host, _, port = a.rpartition(":")
        if host.strip("[]") in ("127.0.0.1", "localhost", "::1", "0.0.0.0") and port.isdigit():
            want[int(port)] = a
    if not want:
        return {}
    inodes: dict[str, str] = {}
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            port = int(parts[1].rsplit(":", 1)[1], 16)
            if parts[3] == "0A" and port in want:  # LISTEN
                inodes[f"socket:[{parts[9]}]"] = want[port]
    out: dict[str, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                a = inodes.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
                if a:
                    out.setdefault(a, int(pid))
        except OSError:
            continue
    return out


class SimFleet:
    """N simulated vLLM servers in one process, restarted fresh for every system."""

    local = True

    def __init__(self, n: int, workdir: Path, args: list[str], model: str = "sim-model") -> None:
        from .devstack import free_ports

        self.ports = free_ports(n)
        self.workdir = workdir
        self.args = args
        self.model = model
        self.proc = None
        self.addresses = [f"127.0.0.1:{p}" for p in self.ports]
        self.kv_base = self.replay_base = 0

    def start(self, kv_events: bool = False, roles: list[str] | None = None) -> Backends:
        """Start the fleet; with ``kv_events`` every server publishes vLLM's KV-cache events
        (``--kv-events-config``): server i connects out to ``kv_base + i`` and binds its
        replay ROUTER on ``replay_base + i`` (see ``kv_lb_config``). ``roles`` (one per
        server: prefill, decode) starts them split for prefill/decode, with vLLM's
        NixlConnector flow (``--roles``)."""
        import json

        from .devstack import free_port_range, start_sim

        self.stop()
        extra: list[str] = []
        if kv_events:
            n = len(self.ports)
            self.kv_base = free_port_range(n, avoid=self.ports)
            self.replay_base = free_port_range(n, avoid=[*self.ports, *range(self.kv_base, self.kv_base + n)])
            extra = ["--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{self.kv_base}",
                "replay_endpoint": f"tcp://127.0.0.1:{self.replay_base}", "topic": "kv@{host}:{port}"})]
        if roles:
            extra += ["--roles", ",".join(roles)]
        self.proc = start_sim(self.workdir, self.ports, "--model", self.model, "--admin-port", "-1", *self.args,
                              *extra, name="sim")
        return Backends(list(self.addresses), self.model, pids={"sim": self.proc.p.pid}, roles=list(roles or []))

    def prepare(self, kv_events: bool = False, roles: list[str] | None = None) -> tuple[Backends, dict]:
        return self.start(kv_events, roles), {"state": "fresh", "how": "simulator restarted"}

    def kv_lb_config(self) -> dict:
        """A KV-events route's lb_config for this fleet as last started with ``kv_events``:
        the simulator's tokenizer, and per backend where ai-lb binds for its events and
        where its replay endpoint is."""
        import vllmsim

        return {"tokenizer": str(vllmsim.MODEL_DIR), "kv_events": {
            "endpoint": "tcp://127.0.0.1:{port}", "bind": True,
            "endpoints": {a: f"tcp://127.0.0.1:{self.kv_base + i}" for i, a in enumerate(self.addresses)},
            "replay_endpoints": {a: f"tcp://127.0.0.1:{self.replay_base + i}" for i, a in enumerate(self.addresses)}}}

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None


class UserFleet:
    """Servers named with ``--backend-urls``: reset between systems, never restarted."""

    def __init__(self, addresses: list[str], model: str | None, reset_timeout: float = 30.0) -> None:
        self.addresses = addresses
        self.model = model
        self.reset_timeout = reset_timeout
        self.methods: dict[str, str | None] = {}
        self.local = False

    def start(self) -> Backends:
        pids = local_pids(self.addresses)
        self.local = len(pids) == len(self.addresses)
        return Backends(list(self.addresses), self.model or "", pids={"backends": sorted(set(pids.values()))}
                        if pids else {})

    def prepare(self, kv_events: bool = False, roles: list[str] | None = None) -> tuple[Backends, dict]:
        """``kv_events`` is the servers' own setting here: a KV-events route names their
        publishers in ``--ai-lb-config``. Split roles need simulated servers."""
        if roles:
            raise ValueError("a prefill/decode system (ai-lb-pd) needs simulated backends: your servers' roles "
                             "are theirs (run it without --backend-urls)")
        b = self.start()
        return b, asyncio.run(_reset_all(self.addresses, self.methods, self.reset_timeout))

    def stop(self) -> None:
        pass
