"""Kubernetes discovery (lightkube) against an in-test API server that speaks the list and
watch wire format: pods appearing, going unready and disappearing, EndpointSlices and
InferencePools, watches that expire, 410 Gone that forces a relist, bookmarks, an API
server that fails for a while, and periodic resyncs."""

import asyncio
import sys
from pathlib import Path

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: kube_api
import kube_api as k  # noqa: E402

from extproc.config import EndpointsConfig, KubernetesEndpoints  # noqa: E402
from extproc.core import Endpoint, EndpointDirectory  # noqa: E402
from extproc.discovery import k8s_objects as ko  # noqa: E402
from extproc.discovery.kubernetes import KubernetesDiscovery  # noqa: E402

APP = {"app": "vllm"}


async def until(cond, timeout: float = 5.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Rig:
    def __init__(self, api, d, directory, target):
        self.api, self.d, self.directory, self.target = api, d, directory, target
        self.changes = 0

    def eps(self) -> dict[str, bool]:
        return {e.address: e.healthy for e in self.directory.all_known(EndpointsConfig(kubernetes=self.target))}

    def watch_requests(self) -> list[dict]:
        return [r for r in self.api.requests if r.get("watch") == "true"]

    def list_requests(self) -> list[dict]:
        return [r for r in self.api.requests if r.get("watch") != "true"]


@pytest_asyncio.fixture
async def api():
    a = k.FakeKubeAPI()
    await a.start()
    yield a
    await a.stop()


async def start(api, tmp_path, target, **kw) -> Rig:
    from lightkube import AsyncClient, KubeConfig

    cfg = tmp_path / "kubeconfig"
    cfg.write_text(api.kubeconfig("llm"))
    directory = EndpointDirectory()
    rig = Rig(api, None, directory, target)

    def changed():
        rig.changes += 1

    kw.setdefault("backoff", (0.05, 0.2))
    rig.d = KubernetesDiscovery([target], directory, changed, client=AsyncClient(config=KubeConfig.from_file(cfg)), **kw)
    rig.d.start()
    assert await rig.d.wait_synced(5.0)
    return rig


@pytest.mark.asyncio
async def test_pods_appear_go_unready_and_disappear(api, tmp_path):
    api.put(k.POD, k.pod("a", "10.0.0.1", APP))
    api.put(k.POD, k.pod("b", "10.0.0.2", APP, ready=False))
    api.put(k.POD, k.pod("pending", None, APP, phase="Pending"))    # no IP yet: not an endpoint
    api.put(k.POD, k.pod("other", "10.0.0.9", {"app": "other"}))    # another app
    rig = await start(api, tmp_path, KubernetesEndpoints(namespace="llm", selector=tuple(APP.items()), port=8000))
    try:
        assert rig.eps() == {"10.0.0.1:8000": True, "10.0.0.2:8000": False}
        (lst,) = rig.list_requests()
        assert lst["labelSelector"] == "app=vllm" and lst["path"] == "/api/v1/namespaces/llm/pods"
        await until(lambda: rig.watch_requests(), what="the watch")
        w = rig.watch_requests()[0]
        assert w["allowWatchBookmarks"] == "true" and w["resourceVersion"] == "104"  # the list's version

        api.put(k.POD, k.pod("c", "10.0.0.3", APP))                                   # ADDED
        api.put(k.POD, k.pod("b", "10.0.0.2", APP, ready=True))                       # MODIFIED: ready now
        api.put(k.POD, k.pod("pending", "10.0.0.4", APP))                             # got its IP
        await until(lambda: rig.eps() == {"10.0.0.1:8000": True, "10.0.0.2:8000": True,
                                          "10.0.0.3:8000": True, "10.0.0.4:8000": True}, what="pods added")
        api.put(k.POD, k.pod("a", "10.0.0.1", APP, ready=False))                      # goes unready
        api.put(k.POD, k.pod("c", "10.0.0.3", APP, terminating=True))                 # being deleted
        await until(lambda: rig.eps()["10.0.0.1:8000"] is False and rig.eps()["10.0.0.3:8000"] is False)
        assert rig.directory.candidates(EndpointsConfig(kubernetes=rig.target)) == (
            Endpoint("10.0.0.2:8000"), Endpoint("10.0.0.4:8000"))
        api.delete(k.POD, "llm", "c")                                                 # DELETED
        api.put(k.POD, k.pod("pending", "10.0.0.4", {"app": "moved"}))               # relabelled away
        await until(lambda: rig.eps() == {"10.0.0.1:8000": False, "10.0.0.2:8000": True}, what="pods gone")
        assert len(rig.list_requests()) == 1  # all of it from one watch
    finally:
        await rig.d.stop()


@pytest.mark.asyncio
async def test_expired_watch_resumes_from_the_last_version_and_bookmarks_move_it(api, tmp_path):
    api.put(k.POD, k.pod("a", "10.0.0.1", APP))
    rig = await start(api, tmp_path, KubernetesEndpoints(namespace="llm", selector=tuple(APP.items()), port=8000))
    try:
        await until(lambda: len(rig.watch_requests()) == 1)
        api.put(k.POD, k.pod("b", "10.0.0.2", APP))
        await until(lambda: "10.0.0.2:8000" in rig.eps())
        seen = str(api.rv)
        api.expire_watches()  # the server ends the stream (its timeoutSeconds)
        await until(lambda: len(rig.watch_requests()) == 2, what="the re-watch")
        assert rig.watch_requests()[1]["resourceVersion"] == seen  # resumed, not relisted
        await until(lambda: api.watches)
        api.bookmark()
        bookmarked = str(api.rv)
        await until(lambda: rig.d.watches[0].stats["bookmarks"] == 1)
        api.expire_watches()
        await until(lambda: len(rig.watch_requests()) == 3)
        assert rig.watch_requests()[2]["resourceVersion"] == bookmarked
        assert len(rig.list_requests()) == 1
        api.put(k.POD, k.pod("c", "10.0.0.3", APP))  # and the resumed watch still delivers
        await until(lambda: "10.0.0.3:8000" in rig.eps())
    finally:
        await rig.d.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_410_gone_forces_a_relist_that_sees_what_the_gap_hid(api, tmp_path, as_http):
    api.gone_as_http = as_http
    api.put(k.POD, k.pod("a", "10.0.0.1", APP))
    api.put(k.POD, k.pod("b", "10.0.0.2", APP))
    rig = await start(api, tmp_path, KubernetesEndpoints(namespace="llm", selector=tuple(APP.items()), port=8000))
    try:
        await until(lambda: api.watches, what="the watch")
        (w,) = api.watches
        api.watches.remove(w)           # the client's watch stops hearing of changes...
        api.delete(k.POD, "llm", "b")   # ... while b is deleted
        api.put(k.POD, k.pod("c", "10.0.0.3", APP))
        api.compact()                   # and the history that said so is compacted away
        w.queue.put_nowait(None)        # then its stream ends: the re-watch gets 410
        await until(lambda: rig.eps() == {"10.0.0.1:8000": True, "10.0.0.3:8000": True}, what="the relist")
        lw = rig.d.watches[0]
        assert lw.stats["relists_gone"] == 1 and lw.stats["errors"] == 0
        assert len(rig.list_requests()) == 2
    finally:
        await rig.d.stop()


@pytest.mark.asyncio
async def test_api_server_errors_keep_the_last_view_and_back_off(api, tmp_path):
    api.put(k.POD, k.pod("a", "10.0.0.1", APP))
    rig = await start(api, tmp_path, KubernetesEndpoints(namespace="llm", selector=tuple(APP.items()), port=8000))
    try:
        await until(lambda: api.watches)
        api.fail_next = [503, 500, 503]  # the re-watch and two relists fail
        api.expire_watches()
        await until(lambda: not api.fail_next and len(rig.list_requests()) == 3, what="recovery")
        assert rig.eps() == {"10.0.0.1:8000": True}  # kept all along
        assert rig.d.watches[0].stats["errors"] == 3
        api.put(k.POD, k.pod("b", "10.0.0.2", APP))
        await until(lambda: "10.0.0.2:8000" in rig.eps())
    finally:
        await rig.d.stop()


@pytest.mark.asyncio
async def test_periodic_resync_relists(api, tmp_path):
    api.put(k.POD, k.pod("a", "10.0.0.1", APP))
    rig = await start(api, tmp_path, KubernetesEndpoints(namespace="llm", selector=tuple(APP.items()), port=8000),
                      resync_interval=0.2)
    try:
        await until(lambda: len(rig.list_requests()) >= 3, what="resyncs")
        assert rig.d.watches[0].stats["errors"] == 0 and rig.eps() == {"10.0.0.1:8000": True}
    finally:
        await rig.d.stop()


@pytest.mark.asyncio
async def test_service_endpointslices_with_their_conditions(api, tmp_path):
    api.put(k.SLICE, k.endpoint_slice("llm-abc", "llm", [
        ("10.0.1.1", {"ready": True, "serving": True, "terminating": False}),
        ("10.0.1.2", {"ready": False, "serving": False, "terminating": False}),
        ("10.0.1.3", {})]))  # unknown: read as ready (API reference)
    api.put(k.SLICE, k.endpoint_slice("llm-def", "llm", [
        ("10.0.1.4", {"ready": False, "serving": True, "terminating": True})]))
    api.put(k.SLICE, k.endpoint_slice("other-x", "other", [("10.0.9.9", {"ready": True})]))
    rig = await start(api, tmp_path, KubernetesEndpoints(namespace="llm", service="llm", port="http"))
    try:
        assert rig.eps() == {"10.0.1.1:8000": True, "10.0.1.2:8000": False, "10.0.1.3:8000": True,
                             "10.0.1.4:8000": False}
        assert rig.list_requests()[0]["labelSelector"] == "kubernetes.io/service-name=llm"
        api.delete(k.SLICE, "llm", "llm-def")
        api.put(k.SLICE, k.endpoint_slice("llm-abc", "llm", [("10.0.1.1", {"ready": False})]))
        await until(lambda: rig.eps() == {"10.0.1.1:8000": False}, what="slice changes")
    finally:
        await rig.d.stop()


@pytest.mark.asyncio
async def test_inference_pool_selector_and_port_follow_the_pool(api, tmp_path):
    api.put(k.POD, k.pod("a", "10.0.0.1", APP))
    api.put(k.POD, k.pod("b", "10.0.0.2", {"app": "vllm-b"}))
    rig = await start(api, tmp_path, KubernetesEndpoints(namespace="llm", inference_pool="pool"))
    try:
        assert rig.eps() == {}  # no pool yet: synced, no endpoints
        pool_lists = [r for r in rig.list_requests() if r["path"].endswith("/inferencepools")]
        assert pool_lists[0]["fieldSelector"] == "metadata.name=pool"
        api.put(k.POOL, k.inference_pool("pool", APP, port=8000))
        await until(lambda: rig.eps() == {"10.0.0.1:8000": True}, what="the pool's pods")
        api.put(k.POOL, k.inference_pool("pool", {"app": "vllm-b"}, port=9000))  # the pool changes
        await until(lambda: rig.eps() == {"10.0.0.2:9000": True}, what="the new selector")
        api.put(k.POD, k.pod("b", "10.0.0.2", {"app": "vllm-b"}, ready=False))
        await until(lambda: rig.eps() == {"10.0.0.2:9000": False})
        api.delete(k.POOL, "llm", "pool")
        await until(lambda: rig.eps() == {}, what="the pool's removal")
    finally:
        await rig.d.stop()


def test_readiness_rules_on_api_reference_json():
    assert ko.pod_endpoint(k.pod("a", "fd00::7", APP), 8000) == Endpoint("[fd00::7]:8000", True)
    assert ko.pod_endpoint(k.pod("a", "10.0.0.1", APP, phase="Succeeded"), 8000).healthy is False
    assert ko.pod_endpoint(k.pod("a", None, APP), 8000) is None
    es = k.endpoint_slice("s", "svc", [("10.0.0.1", {"ready": True})], port=8000, port_name="http")
    assert ko.slices_to_endpoints([es], 8000) == (Endpoint("10.0.0.1:8000"),)
    assert ko.slices_to_endpoints([es], "grpc") == ()  # no such port
    fqdn = k.endpoint_slice("s", "svc", [("example.com", {"ready": True})], address_type="FQDN")
    assert ko.slices_to_endpoints([fqdn], None) == ()
    with pytest.raises(ko.PoolSpecError):
        ko.pool_selector_and_port({"spec": {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 1}]}})
