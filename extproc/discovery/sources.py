"""The endpoint sources a config asks for, as one object: Envoy's admin API (for
``endpoints.cluster`` and routes that read their own cluster), Kubernetes (for
``endpoints.kubernetes``) and the registry with its registration API (``registration:``,
for ``endpoints.registered``). Started together, restarted on reload when their settings
change, and ``synced`` once every one of them has reported once (readiness)."""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..config import Config
from ..core.directory import EndpointDirectory
from ..state.registry_store import MemoryRegistry, RedisRegistry
from .envoy_admin import EnvoyAdminDiscovery
from .kubernetes import KubernetesDiscovery
from .register_api import RegisterApi
from .registry import RegistryMetrics, RegistrySource

log = logging.getLogger("ai_lb.discovery")


def kubernetes_targets(cfg: Config) -> tuple:
    return tuple(dict.fromkeys(r.endpoints.kubernetes for r in cfg.routes.values()
                               if r.enabled and r.endpoints.kubernetes is not None))


class EndpointSources:
    def __init__(self, directory: EndpointDirectory, on_change: Callable[[], None], stores: Any = None,
                 metrics: Any = None, on_hold_limit: Callable[[float | None], None] | None = None) -> None:
        self.directory = directory
        self.on_change = on_change
        self.on_hold_limit = on_hold_limit  # Envoy's longest wait for one ext_proc answer (envoy_admin)
        self.stores = stores      # the gateway's StateStores (the registry's Redis connection)
        self.metrics = metrics    # the CollectorRegistry the registry's metrics join
        self._registry_metrics: RegistryMetrics | None = None
        self.admin: EnvoyAdminDiscovery | None = None
        self.k8s: KubernetesDiscovery | None = None
        self.registry: RegistrySource | None = None
        self.api: RegisterApi | None = None
        self._memory_registry = MemoryRegistry()  # kept across reloads: registrations survive them

    def start(self, cfg: Config) -> None:
        self._start_admin(cfg)
        self._start_k8s(cfg)

    async def start_registry(self, cfg: Config) -> None:
        """The registry and its API (``registration:``), if configured."""
        reg = cfg.registration
        if reg is None:
            return
        url = reg.store or cfg.store
        if url == "memory" or self.stores is None:
            store: Any = self._memory_registry
        else:
            store = RedisRegistry(self.stores.connection(url, reg.redis_timeout / 1000.0), reg.key)
        if self._registry_metrics is None:
            self._registry_metrics = RegistryMetrics(self.metrics)
        self.registry = RegistrySource(reg, store, self.directory, self.on_change, cfg.server.discovery_interval,
                                       self._registry_metrics)
        await self.registry.start()
        self.api = RegisterApi(self.registry, reg.listen, reg.token())
        try:
            await self.api.start()
        except OSError as e:
            log.error("registration API cannot listen on %s: %s", reg.listen, e.strerror or e)
            self.api = None

    async def _stop_registry(self) -> None:
        if self.api is not None:
            await self.api.stop()
        if self.registry is not None:
            await self.registry.stop()
        self.api = self.registry = None

    def _start_admin(self, cfg: Config) -> None:
        s = cfg.server
        if s.envoy_admin:
            self.admin = EnvoyAdminDiscovery(s.envoy_admin, self.directory, s.discovery_interval, on_change=self.on_change,
                                             on_hold_limit=self.on_hold_limit)
            self.admin.start()

    def _start_k8s(self, cfg: Config) -> None:
        targets = kubernetes_targets(cfg)
        if targets:
            self.k8s = KubernetesDiscovery(targets, self.directory, on_change=self.on_change,
                                           resync_interval=cfg.server.kubernetes_resync)
            self.k8s.start()

    async def apply(self, old: Config, new: Config) -> None:
        """A reload: restart what the new config configures differently."""
        if (old.server.envoy_admin, old.server.discovery_interval) != (new.server.envoy_admin, new.server.discovery_interval):
            if self.admin:
                await self.admin.stop()
                self.admin = None
            self._start_admin(new)
        if (kubernetes_targets(old), old.server.kubernetes_resync) != (kubernetes_targets(new), new.server.kubernetes_resync):
            if self.k8s:
                await self.k8s.stop()
                self.k8s = None
            self._start_k8s(new)
        if (old.registration, old.store, old.server.discovery_interval) != \
                (new.registration, new.store, new.server.discovery_interval):
            await self._stop_registry()
            await self.start_registry(new)

    @property
    def synced(self) -> bool:
        return ((self.admin is None or self.admin.synced) and (self.k8s is None or self.k8s.synced.is_set())
                and (self.registry is None or self.registry.synced))

    async def stop(self) -> None:
        for src in (self.admin, self.k8s):
            if src is not None:
                await src.stop()
        self.admin = self.k8s = None
        await self._stop_registry()
