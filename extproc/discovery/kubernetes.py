"""Endpoint discovery from the Kubernetes API (through ``lightkube``), feeding the same
``EndpointDirectory`` as Envoy's admin API.

Each configured source (``endpoints.kubernetes`` of a route) is kept current the way
client-go's informers do it:

* **list, then watch** from the list's ``resourceVersion``, with watch bookmarks asked for
  (``allowWatchBookmarks``), so a quiet watch that the server ends can be resumed without
  replaying or losing anything;
* **410 Gone** (the version has been compacted away; an ``ERROR`` event in the stream or
  the watch request's own status) **forces a relist**, since resuming from "now" would
  miss deletions made in the gap;
* a **resync** relists every ``resync_interval`` seconds even when nothing went wrong;
* any other failure (API server down, 5xx, a broken stream) keeps the last good view and
  retries with **exponential backoff** and jitter (``backoff_initial``..``backoff_max``).

An InferencePool source watches the pool itself and runs a pod watch for the pool's
selector and target port, restarted whenever the pool's spec changes. What RBAC this needs
(``get``/``list``/``watch`` on pods, endpointslices and inferencepools in the namespace) is
in ``deploy/``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Callable, Iterable

from ..config import KubernetesEndpoints
from ..core.directory import EndpointDirectory
from ..core.endpoint import Endpoint
from . import k8s_objects as ko

log = logging.getLogger("ai_lb.discovery.kubernetes")

SOURCE = "kubernetes"  # the directory's name for everything this module reports
POOL_GROUP, POOL_VERSION = "inference.networking.k8s.io", "v1"


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): relist."""


def _is_gone(e: Exception) -> bool:
    status = getattr(e, "status", None)  # lightkube's ApiError: the Status object
    if getattr(status, "code", None) == 410:
        return True
    return getattr(getattr(e, "response", None), "status_code", None) == 410  # the HTTP status


def _resources() -> tuple[Any, Any, Any]:
    from lightkube.generic_resource import create_namespaced_resource
    from lightkube.resources.core_v1 import Pod
    from lightkube.resources.discovery_v1 import EndpointSlice

    pool = create_namespaced_resource(POOL_GROUP, POOL_VERSION, "InferencePool", "inferencepools")
    return Pod, EndpointSlice, pool


class Backoff:
    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum, self.delay = initial, maximum, initial

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, self.maximum)
        return d * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self.delay = self.initial


class ListWatch:
    """One list+watch loop over a resource kind in a namespace; ``on_sync(objects)`` gets
    the whole current set (name -> object dict) after every relist and every event."""

    def __init__(self, client: Any, res: Any, namespace: str, on_sync: Callable[[dict[str, dict]], None], *,
                 labels: dict[str, str] | None = None, fields: dict[str, str] | None = None,
                 resync_interval: float = 300.0, watch_timeout: int = 240,
                 backoff: tuple[float, float] = (0.5, 30.0), name: str = "") -> None:
        self.client, self.res, self.namespace, self.on_sync = client, res, namespace, on_sync
        self.labels, self.fields = labels, fields
        self.resync_interval, self.watch_timeout = resync_interval, watch_timeout
        self.backoff = Backoff(*backoff)
        self.name = name or res.__name__
        self.objects: dict[str, dict] = {}
        self.stats = {"lists": 0, "relists_gone": 0, "resyncs": 0, "errors": 0, "events": 0, "bookmarks": 0}
        self._failing = False
        self._gone_streak = 0

    async def run(self) -> None:
        while True:
            try:
                rv = await self._list()
                await self._watch_until_resync(rv)
                self.stats["resyncs"] += 1
            except asyncio.CancelledError:
                raise
            except Gone:
                self.stats["relists_gone"] += 1
                self._gone_streak += 1
                log.info("%s: watch expired (410 Gone), relisting", self.name)
                if self._gone_streak > 1:  # expired again before any event: do not spin
                    await asyncio.sleep(self.backoff.next())
            except Exception as e:  # noqa: BLE001 - keep the last good view, retry with backoff
                self.stats["errors"] += 1
                if not self._failing:
                    log.warning("%s: list/watch failed (keeping the last view): %r", self.name, e)
                self._failing = True
                await asyncio.sleep(self.backoff.next())

    async def _list(self) -> str:
        try:
            it = self.client.list(self.res, namespace=self.namespace, labels=self.labels, fields=self.fields)
            objs = {o.metadata.name: o.to_dict() async for o in it}
            rv = it.resourceVersion
        except Exception as e:
            if _is_gone(e):
                raise Gone() from None
            raise
        self.stats["lists"] += 1
        self.objects = objs
        if self._failing:
            log.info("%s: list/watch recovered", self.name)
        self._failing = False
        self.backoff.reset()
        self.on_sync(dict(self.objects))
        return rv

    async def _watch_until_resync(self, rv: str) -> None:
        try:
            async with asyncio.timeout(self.resync_interval):
                async for kind, obj in self._events(rv):
                    self._apply(kind, obj)
        except TimeoutError:
            return  # time for the periodic relist
        except Exception as e:  # an ERROR event in the stream, or the watch request's status
            if _is_gone(e):
                raise Gone() from None
            raise

    def _events(self, rv: str) -> Any:
        from lightkube.core.selector import build_selector
        from lightkube.types import OnErrorAction, OnErrorResult

        # lightkube's public watch() has no allowWatchBookmarks; its request builder does.
        gc = self.client._client
        params = {"timeoutSeconds": self.watch_timeout, "resourceVersion": rv, "allowWatchBookmarks": "true",
                  "labelSelector": build_selector(self.labels) if self.labels else None,
                  "fieldSelector": build_selector(self.fields, for_fields=True) if self.fields else None}
        br = gc.prepare_request("list", res=self.res, namespace=self.namespace, watch=True, params=params)
        return gc.watch(br, on_error=lambda e, n: OnErrorResult(OnErrorAction.RAISE))

    def _apply(self, kind: str, obj: Any) -> None:
        if kind == "BOOKMARK":
            self.stats["bookmarks"] += 1  # lightkube keeps its resourceVersion for the next watch
            return
        self.stats["events"] += 1
        self._gone_streak = 0
        name = obj.metadata.name
        if kind == "DELETED":
            self.objects.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.objects[name] = obj.to_dict()
        else:
            return
        self.on_sync(dict(self.objects))


class KubernetesDiscovery:
    """Keeps every configured Kubernetes source in the directory (source ``kubernetes``)."""

    def __init__(self, targets: Iterable[KubernetesEndpoints], directory: EndpointDirectory,
                 on_change: Callable[[], None] | None = None, *, client: Any = None,
                 resync_interval: float = 300.0, backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        self.targets = tuple(dict.fromkeys(targets))
        self.directory = directory
        self.on_change = on_change
        self.resync_interval = resync_interval
        self.backoff = backoff
        self._client = client
        self._sets: dict[str, tuple[Endpoint, ...]] = {}
        self._synced: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._pool_tasks: dict[str, asyncio.Task] = {}
        self._pool_spec: dict[str, tuple] = {}
        self.watches: list[ListWatch] = []
        self.synced = asyncio.Event()  # every source listed once (readiness)

    def start(self) -> None:
        if self._client is None:
            from lightkube import AsyncClient

            self._client = AsyncClient()  # in-cluster config, else $KUBECONFIG, else ~/.kube/config
        if not self.targets:
            self.synced.set()
        loop = asyncio.get_running_loop()
        for t in self.targets:
            self._tasks.append(loop.create_task(self._run_target(t), name=f"k8s {t.key}"))

    async def stop(self) -> None:
        tasks = self._tasks + list(self._pool_tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks, self._pool_tasks = [], {}
        if self._client is not None and hasattr(self._client, "close"):
            try:
                await self._client.close()
            except Exception:  # noqa: BLE001
                pass

    # -- per source --------------------------------------------------------------------
    def _watch(self, res: Any, ns: str, on_sync: Callable[[dict[str, dict]], None], name: str, **kw: Any) -> ListWatch:
        lw = ListWatch(self._client, res, ns, on_sync, resync_interval=self.resync_interval,
                       backoff=self.backoff, name=name, **kw)
        self.watches.append(lw)
        return lw

    async def _run_target(self, t: KubernetesEndpoints) -> None:
        Pod, EndpointSlice, Pool = _resources()
        ns = t.namespace or self._client.namespace
        if t.inference_pool:
            lw = self._watch(Pool, ns, lambda objs: self._pool_changed(t, ns, objs.get(t.inference_pool)),
                             f"inferencepool {ns}/{t.inference_pool}", fields={"metadata.name": t.inference_pool})
        elif t.service:
            lw = self._watch(EndpointSlice, ns, lambda objs: self._publish(t, ko.slices_to_endpoints(objs.values(), t.port)),
                             f"endpointslices {ns}/{t.service}", labels={"kubernetes.io/service-name": t.service})
        else:
            port = int(t.port)  # type: ignore[arg-type] - validated: required with a selector
            lw = self._watch(Pod, ns, lambda objs: self._publish(t, ko.pods_to_endpoints(objs.values(), port)),
                             f"pods {ns}/{dict(t.selector)}", labels=dict(t.selector))
        await lw.run()

    def _pool_changed(self, t: KubernetesEndpoints, ns: str, pool: dict | None) -> None:
        if pool is None:
            spec: tuple = ()
        else:
            try:
                labels, port = ko.pool_selector_and_port(pool)
                spec = (tuple(sorted(labels.items())), port)
            except ko.PoolSpecError as e:
                log.warning("inferencepool %s/%s unusable: %s", ns, t.inference_pool, e)
                spec = ()
        if self._pool_spec.get(t.key) == spec and t.key in self._synced:
            return
        self._pool_spec[t.key] = spec
        old = self._pool_tasks.pop(t.key, None)
        if old is not None:
            old.cancel()
        if not spec:  # no pool (yet), or unusable: no endpoints, and that is a sync too
            self._publish(t, ())
            return
        labels, port = dict(spec[0]), spec[1]
        Pod = _resources()[0]
        lw = self._watch(Pod, ns, lambda objs: self._publish(t, ko.pods_to_endpoints(objs.values(), port)),
                         f"pods of inferencepool {ns}/{t.inference_pool}", labels=labels)
        self._pool_tasks[t.key] = asyncio.get_running_loop().create_task(lw.run(), name=f"k8s pods {t.key}")

    def _publish(self, t: KubernetesEndpoints, eps: tuple[Endpoint, ...]) -> None:
        self._sets[t.key] = eps
        first = t.key not in self._synced
        self._synced.add(t.key)
        if len(self._synced) == len(self.targets):
            self.synced.set()
        if (self.directory.update_clusters(dict(self._sets), source=SOURCE) or first) and self.on_change:
            self.on_change()

    async def wait_synced(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.synced.wait()
            return True
        except TimeoutError:
            return False

    def endpoints(self, t: KubernetesEndpoints) -> tuple[Endpoint, ...]:
        return self._sets.get(t.key, ())

