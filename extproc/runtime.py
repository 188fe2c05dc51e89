"""The live route table: config applied to policies and endpoints, swapped on reload.

A reload builds a complete new table and swaps one reference, so a request sees either
the old or the new config, never a mix. Policies whose route config did not change are
carried over with their state; replaced ones are closed once their last request is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

from . import config as _config
from .admission import Gate
from .admission.redis_line import RedisLine
from .admission.shared_gate import SharedGate
from .config import Config, EndpointsConfig, RouteConfig, ServerConfig, policy_config
from .core import EndpointDirectory
from .policies import PolicyEnv, registry
from .policies.base import Policy
from .signals import LoadView, ScraperService
from .state import StateStores

log = logging.getLogger("ai_lb.runtime")

CATCH_ALL = "*"


# Config loading with the built-in policy catalog (config.py itself knows no policy).
def load_config(path: str | Path) -> Config:
    return _config.load_config(path, registry)


def parse_config(text: str, source: str | None = None) -> Config:
    return _config.parse_config(text, registry, source)


def build_config(raw: Any, source: str | None = None) -> Config:
    return _config.build_config(raw, registry, source)


class RouteRuntime:
    """One route's compiled config; read on every request, so plain attributes only."""

    __slots__ = ("name", "config", "policy", "policy_name", "enabled", "needs_body", "needs", "endpoints",
                 "by_endpoint", "fallbacks", "sample", "gate", "needs_unheld", "one_trip", "_cand", "_cand_version",
                 "_told", "_by_cluster", "on_learned", "no_prefill")

    def __init__(self, config: RouteConfig, policy: Policy | None, gate: Gate | None = None,
                 server: ServerConfig | None = None) -> None:
        server = server or ServerConfig()
        self.name = config.name
        self.gate = gate
        self.config = config
        self.policy = policy
        self.policy_name = config.lb_policy
        self.enabled = config.enabled and policy is not None
        self.endpoints = config.endpoints
        self.by_endpoint = config.lb_type == "endpoint"  # cluster policies get no endpoint candidates
        # A prefill server is never a destination, except for a policy that knows roles (pd).
        self.no_prefill = not (policy is not None and policy.uses_roles)
        self.needs_body = bool(policy and policy.needs_body)
        # GIE fallbacks after the pick; the response headers then tell which one served.
        self.fallbacks = server.fallback_endpoints if config.fallback_endpoints is None else config.fallback_endpoints
        if not self.by_endpoint:
            self.fallbacks = 0
        buffered = (config.body_mode or server.body_mode) == "buffered"
        # What the policy needs to see: (request body, response headers, response body, BUFFERED).
        self.needs: tuple[bool, bool, bool, bool] | None = (
            policy.needs_body, policy.needs_response_headers or self.fallbacks > 0, policy.needs_response_body,
            buffered) if policy else None
        # ... when the access log reports the end: it names the endpoint that served, so the
        # response headers are asked for only when the policy reads them, and nothing holds
        # the stream (the fifth field: response trailers).
        self.needs_unheld: tuple | None = (
            policy.needs_body, policy.needs_response_headers and not policy.status_only, policy.needs_response_body,
            buffered, False) if policy else None
        self.one_trip = bool(policy) and not (self.needs_unheld[1] or self.needs_unheld[2])
        self.sample = policy.first_token_sample if policy and not policy.needs_response_body else 0.0
        self._cand: tuple = ()
        self._cand_version = -1
        self._told = False
        self._by_cluster: dict[str, tuple[int, tuple]] = {}  # route_cluster: Envoy cluster -> (version, candidates)
        self.on_learned: Any = None  # called when a route_cluster route first sees a cluster

    def candidates(self, directory: EndpointDirectory, cluster: str | None = None) -> tuple:
        """Healthy endpoints, re-resolved only when discovery changed something (and then
        the policy hears of it). ``cluster``: the Envoy cluster of this request, for routes
        that read their own cluster (no ``endpoints:`` given)."""
        if self.endpoints.route_cluster and self.by_endpoint:
            return self._route_cluster(directory, cluster)
        if self._cand_version != directory.version:
            self._cand_version = directory.version
            new = self._destinations(directory.candidates(self.endpoints)) if self.by_endpoint else ()
            if new != self._cand or not self._told:
                self._cand, self._told = new, True
                if self.policy is not None:
                    self.policy.on_candidates(new)
                if self.gate is not None:
                    self.gate.on_candidates(new)
        return self._cand

    def _route_cluster(self, directory: EndpointDirectory, cluster: str | None) -> tuple:
        if not cluster:
            return ()
        hit = self._by_cluster.get(cluster)
        if hit is not None and hit[0] == directory.version:
            return hit[1]
        new = self._destinations(directory.candidates(EndpointsConfig(cluster=cluster, static=self.endpoints.static)))
        self._by_cluster[cluster] = (directory.version, new)
        if hit is None and self.on_learned is not None:
            self.on_learned()
        if hit is None or hit[1] != new:
            union = tuple({e.address: e for _, c in self._by_cluster.values() for e in c}.values())
            if self.policy is not None:
                self.policy.on_candidates(union)
            if self.gate is not None:
                self.gate.on_candidates(union)
        return new

    def _destinations(self, eps: tuple) -> tuple:
        return tuple(e for e in eps if e.role != "prefill") if self.no_prefill else eps

    def known(self, directory: EndpointDirectory) -> tuple:
        """Every endpoint this route has (for metrics and the load view's retention)."""
        if self.endpoints.route_cluster:
            return tuple(e for c in self._by_cluster for e in directory.all_known(EndpointsConfig(cluster=c)))
        return directory.all_known(self.endpoints)


class Runtime:
    """The route table, and the shared signals and state its policies are lent. The gateway
    passes its own; left out, fresh ones are made (tests, benchmarks; a scraper service
    that is never started scrapes nothing)."""

    def __init__(self, directory: EndpointDirectory | None = None, load: LoadView | None = None,
                 stores: StateStores | None = None, scrapes: ScraperService | None = None) -> None:
        self.directory = directory or EndpointDirectory()
        self.load = load or LoadView(stores.inflight if stores is not None else None)
        self.stores = stores or StateStores(self.load.inflight)
        self.scrapes = scrapes or ScraperService(on_sample=self.load.on_scrape)
        self.routes: dict[str, RouteRuntime] = {}
        self.catch_all: RouteRuntime | None = None
        self.config: Config | None = None
        self._active: dict[int, int] = {}  # id(policy) -> requests it still owns
        self.on_learned: Any = None  # a route that reads its own cluster met a new one (gauges)
        self._gates: dict[tuple, Gate] = {}  # (route, queue config) -> its gate (waiters survive reloads)
        self._retired: dict[int, Policy] = {}
        self.hold_limit: float | None = None  # Envoy's longest wait for one ext_proc answer (discovered)

    def set_hold_limit(self, limit: float | None) -> None:
        """Envoy's longest wait for one ext_proc answer: every queue holds requests less."""
        self.hold_limit = limit
        for g in self._gates.values():
            g.set_hold_limit(limit)

    def lookup(self, route_name: str) -> RouteRuntime | None:
        rt = self.routes.get(route_name)
        return rt if rt is not None else self.catch_all

    async def apply(self, config: Config) -> None:
        """Install ``config``. Raises (and keeps the old table) if a new policy fails to start."""
        old = {r.config.policy_key() + (name, config.store): r.policy
               for name, r in self.routes.items() if r.policy is not None} if self.config else {}
        new_routes: dict[str, RouteRuntime] = {}
        started: list[Policy] = []
        gates: dict[tuple, Gate] = {}
        try:
            for name, rc in config.routes.items():
                if not rc.enabled:
                    new_routes[name] = RouteRuntime(rc, None, server=config.server)
                    continue
                key = rc.policy_key() + (name, config.store)
                policy = old.get(key)
                if policy is None:
                    cls = registry.get(rc.lb_policy)
                    parsed = policy_config(cls.Config, rc.lb_config)
                    policy = cls(parsed, PolicyEnv(route=rc, load=self.load, stores=self.stores,
                                                   scrapes=self.scrapes, store_url=config.store))
                    await policy.start()
                    started.append(policy)
                new_routes[name] = RouteRuntime(rc, policy, await self._gate(rc, gates, config.store), config.server)
                new_routes[name].on_learned = self._learned
        except Exception:
            for p in started:
                await _close_quietly(p)
            raise
        kept = {id(r.policy) for r in new_routes.values()}
        retired = [r.policy for r in self.routes.values() if r.policy is not None and id(r.policy) not in kept]
        for rt in new_routes.values():
            rt.candidates(self.directory)  # each policy hears of its candidates before a pick
        self.routes = new_routes
        self.catch_all = new_routes.get(CATCH_ALL)
        self.config = config
        for key, g in self._gates.items():
            if key not in gates:
                g.close()  # its waiters get a 503: their route's queue is gone
        self._gates = gates
        for p in retired:
            self._retire(p)

    def _learned(self) -> None:
        if self.on_learned is not None:
            self.on_learned()

    async def _gate(self, rc: RouteConfig, gates: dict[tuple, Gate], store: str) -> Gate | None:
        """The route's queue: kept across reloads while its config is the same (its waiters
        keep waiting); shared by every replica through Redis with a Redis store."""
        if rc.queue is None:
            return None
        key = (rc.name, store, _config._freeze(dataclasses.asdict(rc.queue)))
        g = self._gates.get(key) or gates.get(key)
        if g is None:
            if store == "memory":
                g = Gate(rc.name, rc.queue, self.load)
            else:
                counts = self.stores.counts(store, rc.queue.redis_timeout / 1000.0)
                g = SharedGate(rc.name, rc.queue, self.load, RedisLine(counts, rc.pool))
            await g.start()
        g.set_hold_limit(self.hold_limit)
        gates[key] = g
        return g

    def refresh_candidates(self) -> None:
        """Discovery changed: let every route's policy see its new candidates now, not at
        its next request (scrapers follow the fleet even without traffic)."""
        for rt in self.routes.values():
            rt.candidates(self.directory)
            for cluster in tuple(rt._by_cluster):  # routes that read each request's own cluster
                rt.candidates(self.directory, cluster)
        self._retain()

    def _retain(self) -> None:
        known: set[str] = set()
        for rt in self.routes.values():
            known.update(e.address for e in rt.known(self.directory))
        self.load.retain(known)

    # -- policy ownership: a replaced policy is closed after its last on_done ----------
    def acquire(self, policy: Policy) -> None:
        k = id(policy)
        self._active[k] = self._active.get(k, 0) + 1

    def release(self, policy: Policy) -> None:
        k = id(policy)
        n = self._active.get(k, 0) - 1
        if n > 0:
            self._active[k] = n
            return
        self._active.pop(k, None)
        p = self._retired.pop(k, None)
        if p is not None:
            asyncio.get_running_loop().create_task(_close_quietly(p))

    def _retire(self, policy: Policy) -> None:
        if self._active.get(id(policy)):
            self._retired[id(policy)] = policy
        else:
            asyncio.get_running_loop().create_task(_close_quietly(policy))

    async def close(self) -> None:
        for r in self.routes.values():
            if r.policy is not None:
                await _close_quietly(r.policy)
        for p in self._retired.values():
            await _close_quietly(p)
        self.routes, self._retired = {}, {}


async def _close_quietly(p: Policy) -> None:
    try:
        await p.close()
    except Exception:  # noqa: BLE001
        log.exception("closing policy %s failed", getattr(p, "name", p))
