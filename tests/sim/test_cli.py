"""Synchronous entry points: the CLI in a subprocess, the thread helper, argument errors."""
from __future__ import annotations

import json
import random
import socket
import urllib.error
import urllib.request

import pytest

from vllmsim.cli import main
from vllmsim.testing import run_cluster_subprocess, run_cluster_thread


def post_chat(url: str, content: str = "hi", max_tokens: int = 2) -> tuple[int, dict[str, str], dict]:
    body = json.dumps({"messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, dict(r.headers), json.loads(r.read())


def _bindable(port: int) -> bool:
    with socket.socket() as t:
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the simulator binds
        try:
            t.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int) -> int:
    """A base port with n free consecutive ports, below Linux's ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000)
        if all(_bindable(p) for p in range(base, base + n)):
            return base
    raise RuntimeError("no free port block")


def test_subprocess_cluster_consecutive_ports_crash_restart() -> None:
    base = free_port_block(3)
    with run_cluster_subprocess(3, base_port=base, args=["--time-scale", "0.05", "--seed", "3",
                                                         "--model", "m1"]) as h:
        assert h.ports == [base, base + 1, base + 2]
        served = set()
        for url in h.urls:
            status, headers, body = post_chat(url)
            assert status == 200 and body["model"] == "m1"
            served.add(headers["x-sim-server"])
        assert served == {str(p) for p in h.ports}
        h.crash(1)
        with pytest.raises(urllib.error.URLError):
            post_chat(h.urls[1])
        h.restart(1)
        assert post_chat(h.urls[1])[0] == 200
        h.set_faults(0, error_rate=1.0, error_status=503)
        with pytest.raises(urllib.error.HTTPError) as e:
            post_chat(h.urls[0])
        assert e.value.code == 503
        assert [s["alive"] for s in h.state()] == [True, True, True]
    assert h.proc.poll() is not None  # stopped


def test_subprocess_explicit_ports_names_and_roles() -> None:
    base = free_port_block(6)
    a, b = base, base + 5  # not consecutive
    with run_cluster_subprocess(ports=[a, b], args=["--names", "p0,d0", "--roles", "prefill,decode",
                                                    "--time-scale", "0.05", "--admin-port", "-1"]) as h:
        assert h.ports == [a, b] and h.admin_port is None
        s0, h0, b0 = post_chat(h.urls[0], max_tokens=5)
        s1, h1, b1 = post_chat(h.urls[1], max_tokens=5)
        assert (h0["x-sim-server"], h1["x-sim-server"]) == ("p0", "d0")
        # Roles are kv-transfer configs: without kv_transfer_params a request is served whole.
        assert b0["usage"]["completion_tokens"] == 5 and b1["usage"]["completion_tokens"] == 5
        assert b0["kv_transfer_params"] is None
        states = [json.loads(urllib.request.urlopen(f"{u}/sim/state", timeout=5).read()) for u in h.urls]
        assert [s["kv_role"] for s in states] == ["kv_producer", "kv_consumer"]
        assert all(s["side_channel_port"] for s in states)


def test_thread_cluster_from_sync_code(sim) -> None:
    with run_cluster_thread(2, config=sim.make_config()) as h:
        assert len(h.ports) == 2 and all(h.ports)
        assert post_chat(h.urls[0])[0] == 200
        h.call(h.cluster.servers[0].crash())
        with pytest.raises(urllib.error.URLError):
            post_chat(h.urls[0])
        h.call(h.cluster.servers[0].restart())
        assert post_chat(h.urls[0])[0] == 200
        assert h.state(1)["alive"] is True


def test_cli_commands_and_argument_errors(capsys) -> None:
    assert main(["profiles"]) == 0
    assert "h100-8b" in capsys.readouterr().out
    assert main(["show-profile", "h100-8b", "--set", "num_gpu_blocks=99"]) == 0
    assert "num_gpu_blocks: 99" in capsys.readouterr().out
    assert main(["serve", "--profile", "no-such-profile"]) == 2
    assert main(["serve", "--set", "bogus=1"]) == 2
    assert main(["serve", "-n", "2", "--roles", "prefill"]) == 2
    with pytest.raises(SystemExit):
        main(["serve", "--role", "nonsense"])
