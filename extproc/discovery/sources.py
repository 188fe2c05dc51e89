"""The endpoint sources a config asks for, as one object: Envoy's admin API (for
``endpoints.cluster`` and routes that read their own cluster) and Kubernetes (for
``endpoints.kubernetes``). Started together, restarted on reload when their settings
change, and ``synced`` once every one of them has reported once (readiness)."""

from __future__ import annotations

from typing import Callable

from ..config import Config
from ..core.directory import EndpointDirectory
from .envoy_admin import EnvoyAdminDiscovery
from .kubernetes import KubernetesDiscovery


def kubernetes_targets(cfg: Config) -> tuple:
    return tuple(dict.fromkeys(r.endpoints.kubernetes for r in cfg.routes.values()
                               if r.enabled and r.endpoints.kubernetes is not None))


class EndpointSources:
    def __init__(self, directory: EndpointDirectory, on_change: Callable[[], None]) -> None:
        self.directory = directory
        self.on_change = on_change
        self.admin: EnvoyAdminDiscovery | None = None
        self.k8s: KubernetesDiscovery | None = None

    def start(self, cfg: Config) -> None:
        self._start_admin(cfg)
        self._start_k8s(cfg)

    def _start_admin(self, cfg: Config) -> None:
        s = cfg.server
        if s.envoy_admin:
            self.admin = EnvoyAdminDiscovery(s.envoy_admin, self.directory, s.discovery_interval, on_change=self.on_change)
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

    @property
    def synced(self) -> bool:
        return (self.admin is None or self.admin.synced) and (self.k8s is None or self.k8s.synced.is_set())

    async def stop(self) -> None:
        for src in (self.admin, self.k8s):
            if src is not None:
                await src.stop()
        self.admin = self.k8s = None
