"""An in-test Kubernetes API server: the list and watch wire format, nothing more.

It serves pods, EndpointSlices and InferencePools the way kube-apiserver does (paths,
``labelSelector``/``fieldSelector``, JSON shaped as in the API reference):

* a list is ``{"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": ...},
  "items": [...]}`` (items without kind/apiVersion, as the server sends them);
* ``?watch=true&resourceVersion=N`` streams newline-delimited ``{"type": ..., "object":
  ...}`` events after N: ``ADDED``/``MODIFIED``/``DELETED`` (an object that stops matching
  the selector is ``DELETED`` for that watch), ``BOOKMARK`` (only if ``allowWatchBookmarks``),
  and ends the stream after ``timeoutSeconds``;
* a version older than the compaction point gets ``ERROR`` with a 410 ``Status``
  (``reason: Expired``), as the real server sends it, in a 200 stream; ``gone_as_http``
  makes it answer the watch request itself with HTTP 410 instead.

Tests drive it (``put``, ``delete``, ``compact``, ``expire_watches``, ``bookmark``) and read
``requests`` to check what the client asked for.
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

KINDS = {  # path prefix (before /namespaces/NS/PLURAL) and plural -> (apiVersion, kind)
    ("api/v1", "pods"): ("v1", "Pod"),
    ("apis/discovery.k8s.io/v1", "endpointslices"): ("discovery.k8s.io/v1", "EndpointSlice"),
    ("apis/inference.networking.k8s.io/v1", "inferencepools"): ("inference.networking.k8s.io/v1", "InferencePool"),
}


def _selector(s: str | None) -> dict[str, str]:
    out = {}
    for part in filter(None, (s or "").split(",")):
        k, _, v = part.partition("=")
        out[k.strip()] = v.strip().lstrip("=")
    return out


def _field(obj: dict, path: str) -> Any:
    cur: Any = obj
    for p in path.split("."):
        cur = cur.get(p) if isinstance(cur, dict) else None
    return cur


@dataclass
class Watch:
    key: tuple
    namespace: str
    labels: dict
    fields: dict
    bookmarks: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        return (all(labels.get(k) == v for k, v in self.labels.items())
                and all(str(_field(obj, k)) == v for k, v in self.fields.items()))


class FakeKubeAPI:
    def __init__(self) -> None:
        self.rv = 100
        self.objects: dict[tuple, dict[tuple[str, str], dict]] = {k: {} for k in KINDS}
        self.history: dict[tuple, list[tuple[int, dict | None, dict | None]]] = {k: [] for k in KINDS}
        self.compacted = 0      # watches from a version below this get 410
        self.gone_as_http = False
        self.watches: list[Watch] = []
        self.requests: list[dict[str, str]] = []
        self.fail_next: list[int] = []  # HTTP statuses to answer the next requests with
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- driving it --------------------------------------------------------------------
    def put(self, key: tuple, obj: dict) -> dict:
        """Create or replace an object (ADDED or MODIFIED for the watches it matches)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        name, ns = meta["name"], meta.setdefault("namespace", "default")
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        meta.setdefault("uid", f"uid-{ns}-{name}")
        old = self.objects[key].get((ns, name))
        self.objects[key][(ns, name)] = obj
        self._event(key, old, obj)
        return obj

    def delete(self, key: tuple, ns: str, name: str) -> None:
        old = self.objects[key].pop((ns, name))
        self.rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._event(key, gone, None)

    def compact(self) -> None:
        """Forget history up to now: watches resuming from older versions get 410."""
        self.compacted = self.rv

    def expire_watches(self) -> None:
        """End every open watch stream now (as the server does at timeoutSeconds)."""
        for w in self.watches:
            w.queue.put_nowait(None)

    def bookmark(self) -> None:
        self.rv += 1
        for w in self.watches:
            if w.bookmarks:
                api_version, kind = KINDS[w.key]
                w.queue.put_nowait({"type": "BOOKMARK", "object": {
                    "kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(self.rv)}}})

    def _event(self, key: tuple, old: dict | None, new: dict | None) -> None:
        self.history[key].append((self.rv, old, new))
        for w in self.watches:
            if w.key == key:
                ev = self._for_watch(w, old, new)
                if ev is not None:
                    w.queue.put_nowait(ev)

    @staticmethod
    def _for_watch(w: Watch, old: dict | None, new: dict | None) -> dict | None:
        was, now = w.matches(old), w.matches(new)
        if now:
            return {"type": "MODIFIED" if was else "ADDED", "object": new}
        if was:
            return {"type": "DELETED", "object": new if new is not None else old}
        return None

    # -- serving -----------------------------------------------------------------------
    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/{prefix:.+}/namespaces/{ns}/{plural}", self._collection)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        self.expire_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    def kubeconfig(self, namespace: str = "default") -> str:
        return json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "test",
                           "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
                           "users": [{"name": "test", "user": {"token": "test-token"}}],
                           "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                                     "namespace": namespace}}]})

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        key = (request.match_info["prefix"], request.match_info["plural"])
        if key not in KINDS:
            return web.json_response(self._status(404, "NotFound", "the server could not find the requested resource"),
                                     status=404)
        q = request.query
        self.requests.append({"path": request.path, **q})
        if self.fail_next:
            code = self.fail_next.pop(0)
            return web.json_response(self._status(code, "InternalError", "injected failure"), status=code)
        w = Watch(key, request.match_info["ns"], _selector(q.get("labelSelector")), _selector(q.get("fieldSelector")),
                  q.get("allowWatchBookmarks") in ("true", "1"))
        if q.get("watch") in ("true", "1"):
            return await self._watch(request, w, int(q.get("resourceVersion") or 0), float(q.get("timeoutSeconds") or 300))
        api_version, kind = KINDS[key]
        items = []
        for obj in self.objects[key].values():
            if w.matches(obj):
                item = copy.deepcopy(obj)
                item.pop("kind", None)
                item.pop("apiVersion", None)
                items.append(item)
        return web.json_response({"kind": f"{kind}List", "apiVersion": api_version,
                                  "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    async def _watch(self, request: web.Request, w: Watch, since: int, timeout: float) -> web.StreamResponse:
        if since and since < self.compacted and self.gone_as_http:
            return web.json_response(self._status(410, "Expired", f"too old resource version: {since} ({self.compacted})"),
                                     status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        async def send(ev: dict) -> None:
            await resp.write(json.dumps(ev).encode() + b"\n")

        if since and since < self.compacted:
            await send({"type": "ERROR", "object": self._status(410, "Expired",
                                                                f"too old resource version: {since} ({self.compacted})")})
            return resp
        api_version, kind = KINDS[w.key]
        self.watches.append(w)  # from here on, new events queue up for this watch
        try:
            for rv, old, new in list(self.history[w.key]):  # what happened after the client's version
                if rv > since:
                    ev = self._for_watch(w, old, new)
                    if ev is not None:
                        await send(ev)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                try:
                    ev = await asyncio.wait_for(w.queue.get(), max(deadline - loop.time(), 0.001))
                except asyncio.TimeoutError:
                    break
                if ev is None:
                    break
                obj = ev["object"]
                obj.setdefault("kind", kind)
                obj.setdefault("apiVersion", api_version)
                await send(ev)
        finally:
            if w in self.watches:
                self.watches.remove(w)
        return resp


POD = ("api/v1", "pods")
SLICE = ("apis/discovery.k8s.io/v1", "endpointslices")
POOL = ("apis/inference.networking.k8s.io/v1", "inferencepools")


def pod(name: str, ip: str | None, labels: dict, ready: bool = True, phase: str = "Running",
        namespace: str = "llm", terminating: bool = False) -> dict:
    """A Pod as the API reference shapes it (the fields discovery reads, and some it must ignore)."""
    status: dict[str, Any] = {"phase": phase, "conditions": [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "ContainersReady", "status": "True" if ready else "False", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "hostIP": "192.0.2.1", "startTime": "2026-01-01T00:00:00Z"}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels,
                            "creationTimestamp": "2026-01-01T00:00:00Z"}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:10:00Z"
        meta["deletionGracePeriodSeconds"] = 30
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta,
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest",
                                     "ports": [{"containerPort": 8000, "protocol": "TCP"}]}]},
            "status": status}


def endpoint_slice(name: str, service: str, endpoints: list[tuple[str, dict]], port: int = 8000,
                   port_name: str = "http", namespace: str = "llm", address_type: str = "IPv4") -> dict:
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "labels": {
                "kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": address_type,
            "endpoints": [{"addresses": [ip], "conditions": cond, "nodeName": "node-1",
                           "targetRef": {"kind": "Pod", "namespace": namespace, "name": f"pod-{ip}"}}
                          for ip, cond in endpoints],
            "ports": [{"name": port_name, "protocol": "TCP", "port": port}]}


def inference_pool(name: str, labels: dict, port: int = 8000, namespace: str = "llm") -> dict:
    return {"kind": "InferencePool", "apiVersion": "inference.networking.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": labels}, "targetPorts": [{"number": port}],
                     "endpointPickerRef": {"name": "ai-lb", "port": {"number": 50051}, "failureMode": "FailOpen"}}}
