"""aibench.floor, the bench's zero-work ext_proc server: through a real Envoy it must route
every request where its answer says (override_host honoured it) and fail no ext_proc call
(a failed call falls open and would make the floor look faster than it is)."""

import threading
import urllib.request

import pytest
from aibench import devstack as ds
from aibench import floor
from aibench.overhead_wrk import start_instant_backends

pytestmark = pytest.mark.e2e


def test_the_floor_routes_where_it_answers_and_no_call_fails(tmp_path):
    try:
        floor.build(tmp_path / "cache")
    except floor.FloorUnavailable as e:
        pytest.fail(f"scripts/setup.sh installs gcc and libnghttp2-dev: {e}")
    procs = []
    try:
        bports = ds.free_ports(4)
        badmin, listen, admin, fport = ds.free_ports(4)
        procs.append(start_instant_backends(tmp_path, badmin, bports))
        target = bports[2]  # every answer names this backend: native round robin would spread
        procs.append(floor.start(tmp_path, fport, [f"127.0.0.1:{target}"], cache=tmp_path / "cache"))
        procs.append(ds.start_envoy(tmp_path, ds.EnvoyPorts(listen, admin, fport), bports, message_timeout=2.0))
        ds.wait_cluster_healthy(admin, "llm_backends", len(bports))
        ds.wait_cluster_healthy(admin, "ai_lb", 1)   # the floor answers gRPC health checks
        served: list[str] = []

        def client() -> None:
            for _ in range(250):
                req = urllib.request.Request(f"http://127.0.0.1:{listen}/v1/chat/completions", data=b'{"model":"m"}',
                                             headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    served.append(r.headers["x-sim-server"] if r.status == 200 else f"status {r.status}")

        # 2,000 calls from 8 clients at once. (The flat-out bench also trips nghttp2's rapid-reset
        # guard without the floor's setting; this load does not: the bench counts failed calls.)
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(served) == 2000 and set(served) == {str(target)}
        _, stats = ds.http_get(f"http://127.0.0.1:{admin}/stats?filter=ext_proc")
        st = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
        assert st["http.llm.ext_proc.streams_failed"] == "0"
        assert int(st["http.llm.ext_proc.streams_started"]) >= 2000
    finally:
        for p in reversed(procs):
            p.stop()
