"""Registered instances as an endpoint source: the register.yaml loaded at start, what
``POST /register`` adds, health-checked as FastDeploy's router checks them.

* A registration over HTTP is accepted after ``health-success-threshold`` passing checks in
  a row (FastDeploy answers 503 "service is not healthy" otherwise) and then takes traffic.
  register.yaml instances are registered as they are and take traffic once they pass
  ``health-success-threshold`` checks.
* Every ``health-check-interval-secs`` each instance gets ``GET health-check-endpoint``
  (``health-check-timeout-secs``; 200 passes). After ``health-failure-threshold`` failures in
  a row it leaves rotation (unhealthy in the directory, so no policy offers it and Envoy is
  told over EDS); after ``health-success-threshold`` passes in a row it comes back.
  FastDeploy deletes a failed instance instead; here it stays registered (and is deleted
  after ``remove_unhealthy_after_secs`` unhealthy, when that is set).
* The registry lives in a ``RegistryStore``: this process, or Redis, polled every
  discovery interval, so every replica routes to every registered instance. Health is each
  replica's own; an instance another replica registered starts healthy here (it passed
  there). A store that does not answer keeps the last view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..config import RegistrationConfig
from ..config.sources import REGISTERED
from ..config.yaml_text import YamlProblem, load_yaml
from ..core.directory import EndpointDirectory
from ..core.endpoint import ROLES, Endpoint
from ..state.registry_store import RedisUnavailable, RegistryFull, RegistryStore
from .instances import Instance, from_doc, parse_instance

log = logging.getLogger("ai_lb.registry")
MAX_PARALLEL_CHECKS = 64


class Health:
    __slots__ = ("healthy", "fails", "oks", "since")

    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy
        self.fails = self.oks = 0
        self.since = time.monotonic()  # of the current state


class Rejected(Exception):
    """A registration refused: ``status`` (FastDeploy's code) and the message."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


class RegistryMetrics:
    """The registry's metrics, made once per process (a reload's new source reuses them)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry or CollectorRegistry()
        self.events = Counter("ai_lb_registry_events", "Registration API and health-check events: registered, "
                              "rejected_<reason>, unhealthy, healthy, removed.", ["event"], registry=reg)
        self.gauge = Gauge("ai_lb_registered_instances", "Registered instances by role and health.",
                           ["role", "state"], registry=reg)


class RegistrySource:
    def __init__(self, cfg: RegistrationConfig, store: RegistryStore, directory: EndpointDirectory,
                 on_change: Callable[[], None], poll_interval: float = 1.0,
                 metrics: RegistryMetrics | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.directory = directory
        self.on_change = on_change
        self.poll_interval = poll_interval
        self.instances: dict[str, Instance] = {}
        self.health: dict[str, Health] = {}
        self.synced = False
        self._tasks: list[asyncio.Task] = []
        self._session: Any = None
        self._lock = asyncio.Lock()  # registrations and store polls apply one at a time
        m = metrics or RegistryMetrics()
        self.events, self.gauge = m.events, m.gauge

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MAX_PARALLEL_CHECKS))
        await self._load_file()
        await self.poll()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._every(self.poll_interval, self.poll), name="registry-poll"),
                       loop.create_task(self._every(self.cfg.health_check_interval_secs, self.check_round),
                                        name="registry-health")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _every(self, interval: float, fn: Callable) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the loop must go on
                log.warning("registry %s failed: %s: %.200s", fn.__name__, type(e).__name__, e)

    async def _load_file(self) -> None:
        path = self.cfg.register_path
        if not path:
            return
        try:
            doc = load_yaml(Path(path).read_bytes())
        except (OSError, YamlProblem) as e:
            log.error("register file %s: cannot load: %s", path, getattr(e, "strerror", None) or e)
            return
        items = doc.get("instances") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            log.error("register file %s: expected 'instances:' with a list of instances", path)
            return
        for i, raw in enumerate(items):
            inst, problems = parse_instance(raw, origin="file", now=time.time())
            if inst is None:
                log.error("register file %s: instances[%d] skipped: %s", path, i, "; ".join(problems))
                continue
            try:
                await self.store.put(inst.address, inst.to_doc(), self.cfg.max_instances)
            except (RegistryFull, RedisUnavailable) as e:
                log.error("register file %s: instances[%d] (%s) not registered: %s", path, i, inst.address, e)

    # -- the registry ---------------------------------------------------------------------
    async def register(self, inst: Instance) -> None:
        """A ``POST /register``: checked, stored, in rotation; raises ``Rejected``."""
        if inst.address not in self.instances and len(self.instances) >= self.cfg.max_instances:
            raise Rejected(409, f"the registry holds {self.cfg.max_instances} instances (registration.max_instances)")
        for _ in range(self.cfg.health_success_threshold):
            if not await self.check(inst):
                raise Rejected(503, "service is not healthy")
        async with self._lock:
            try:
                await self.store.put(inst.address, inst.to_doc(), self.cfg.max_instances)
            except RegistryFull as e:
                raise Rejected(409, str(e)) from None
            except RedisUnavailable:
                raise Rejected(503, "the registry store is unavailable; try again") from None
            self._apply_one(inst, healthy=True)
        log.info("registered %s instance %s", inst.role, inst.address)
        self._publish()

    async def poll(self) -> None:
        """Read the store (other replicas' registrations, removals)."""
        try:
            docs = await self.store.all()
        except RedisUnavailable:
            return  # the last view stays
        async with self._lock:
            seen = {}
            for iid, doc in docs.items():
                inst = from_doc(doc)
                if inst is not None and inst.address == iid:
                    seen[iid] = inst
            for iid in set(self.instances) - set(seen):
                self.instances.pop(iid, None)
                self.health.pop(iid, None)
            for iid, inst in seen.items():
                if self.instances.get(iid) != inst:
                    self._apply_one(inst, healthy=inst.origin != "file" and iid not in self.health)
        self.synced = True
        self._publish()

    def _apply_one(self, inst: Instance, healthy: bool) -> None:
        known = self.health.get(inst.address)
        self.instances[inst.address] = inst
        if known is None or (healthy and not known.healthy):
            self.health[inst.address] = Health(healthy)

    def _publish(self) -> None:
        eps = tuple(Endpoint(a, self.health[a].healthy, i.role) for a, i in sorted(self.instances.items()))
        for role in ROLES:
            for state, ok in (("healthy", True), ("unhealthy", False)):
                self.gauge.labels(role, state).set(sum(1 for e in eps if e.role == role and e.healthy == ok))
        if self.directory.update_clusters({REGISTERED: eps}, source="registry"):
            self.on_change()

    # -- health checks --------------------------------------------------------------------
    async def check(self, inst: Instance) -> bool:
        import aiohttp

        url = f"http://{inst.address}{self.cfg.health_check_endpoint}"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(
                    total=self.cfg.health_check_timeout_secs), allow_redirects=False) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return False

    async def check_round(self) -> None:
        insts = list(self.instances.values())
        results = await asyncio.gather(*(self.check(i) for i in insts))
        now, cfg, removed = time.monotonic(), self.cfg, []
        for inst, ok in zip(insts, results):
            h = self.health.get(inst.address)
            if h is None:
                continue  # left during the round
            h.oks, h.fails = (h.oks + 1, 0) if ok else (0, h.fails + 1)
            if h.healthy and h.fails >= cfg.health_failure_threshold:
                h.healthy, h.since = False, now
                self.events.labels("unhealthy").inc()
                log.warning("instance %s (%s) left rotation after %d failed health checks", inst.address,
                            inst.role, h.fails)
            elif not h.healthy and h.oks >= cfg.health_success_threshold:
                h.healthy, h.since = True, now
                self.events.labels("healthy").inc()
                log.info("instance %s (%s) is back in rotation", inst.address, inst.role)
            elif not h.healthy and cfg.remove_unhealthy_after_secs and now - h.since > cfg.remove_unhealthy_after_secs:
                removed.append(inst.address)
        for a in removed:
            try:
                await self.store.remove(a)
            except RedisUnavailable:
                continue
            self.instances.pop(a, None)
            self.health.pop(a, None)
            self.events.labels("removed").inc()
            log.warning("instance %s removed from the registry after %.0f s unhealthy", a,
                        cfg.remove_unhealthy_after_secs)
        self._publish()

    async def health_generate(self) -> dict[str, list[str]]:
        """FastDeploy's ``GET /health_generate``: check every instance now (report only)."""
        insts = list(self.instances.values())
        results = await asyncio.gather(*(self.check(i) for i in insts))
        return {"healthy": [f"http://{i.address}" for i, ok in zip(insts, results) if ok],
                "unhealthy": [f"http://{i.address}" for i, ok in zip(insts, results) if not ok]}

    def listing(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {r: [] for r in ROLES}
        for a, inst in sorted(self.instances.items()):
            out[inst.role].append(inst.worker_info(self.health[a].healthy))
        return out
