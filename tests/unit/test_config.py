"""Configuration validation: every kind of error names its field path and what is allowed."""

import subprocess
import sys
import textwrap

import pytest

from extproc.config import ConfigError
from extproc.runtime import parse_config

GOOD = """
server:
  listen: 127.0.0.1:50051
  envoy_admin: http://127.0.0.1:9901
routes:
  llm:
    lb_policy: least_request
    endpoints: {cluster: llm_backends}
  static-route:
    lb_type: endpoint
    lb_policy: round_robin
    lb_config: {}
    endpoints: {static: ["10.0.0.1:8000", "10.0.0.2:8000"]}
  "off":
    lb_policy: random
    enabled: false
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(textwrap.dedent(text))
    return ei.value.problems


def test_good_config_parses_with_defaults():
    c = parse_config(GOOD)
    assert c.store == "memory"
    assert c.routes["llm"].lb_type == "endpoint"
    assert c.routes["llm"].endpoints.cluster == "llm_backends"
    assert c.routes["static-route"].endpoints.static == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert c.routes["off"].enabled is False
    assert c.server.metrics_listen == "127.0.0.1:9464"


def test_unknown_policy_lists_allowed_values():
    (p,) = problems("routes: {r: {lb_policy: fastest, endpoints: {static: ['1.2.3.4:1']}}}")
    assert p.startswith("routes.r.lb_policy: unknown policy 'fastest'")
    assert "least_request" in p and "round_robin" in p and "random" in p


def test_missing_policy_is_required():
    (p,) = problems("routes: {r: {endpoints: {static: ['1.2.3.4:1']}}}")
    assert p.startswith("routes.r.lb_policy: required")


def test_unknown_lb_type():
    ps = problems("routes: {r: {lb_type: pod, lb_policy: random, endpoints: {static: ['1.2.3.4:1']}}}")
    assert any(p.startswith("routes.r.lb_type: unknown lb_type 'pod'; allowed: endpoint, cluster") for p in ps)


def test_unknown_fields_at_every_level():
    ps = problems("""
        servr: {}
        server: {listn: x}
        routes: {r: {lb_policy: random, lb_confg: {}, endpoints: {static: ['1.2.3.4:1'], dns: x}}}
    """)
    assert any(p.startswith("servr: unknown field") for p in ps)
    assert any(p.startswith("server.listn: unknown field; allowed:") and "listen" in p for p in ps)
    assert any(p.startswith("routes.r.lb_confg: unknown field") for p in ps)
    assert any(p.startswith("routes.r.endpoints.dns: unknown field; allowed: cluster, kubernetes, static") for p in ps)


def test_lb_config_field_checked_against_the_policy():
    (p,) = problems("routes: {r: {lb_policy: round_robin, lb_config: {weight: 2}, endpoints: {static: ['1.2.3.4:1']}}}")
    assert p == "routes.r.lb_config.weight: unknown field; this takes no fields"


def test_bad_types_and_values():
    ps = problems("""
        store: mysql://x
        log_level: loud
        server: {listen: nowhere, discovery_interval: fast, max_body_bytes: -1}
        routes: {r: {lb_policy: random, enabled: "yes", endpoints: {static: ["1.2.3.4", 7]}}}
    """)
    text = "\n".join(ps)
    assert "store: expected 'memory' or a redis:// URL, got 'mysql://x'" in text
    assert "log_level: unknown level 'loud'" in text
    assert "server.discovery_interval: expected a number, got 'fast'" in text
    assert "routes.r.enabled: expected true or false" in text
    assert "routes.r.endpoints.static: expected a list of strings" in text


def test_bad_listen_and_endpoint_addresses():
    ps = problems("""
        server: {listen: nowhere}
        routes: {r: {lb_policy: random, endpoints: {static: ["1.2.3.4"]}}}
    """)
    assert "server.listen: expected host:port, got 'nowhere'" in ps
    assert "routes.r.endpoints.static[0]: expected ip:port, got '1.2.3.4'" in ps


def test_endpoints_required_and_cluster_needs_admin():
    ps = problems("routes: {a: {lb_policy: random}, b: {lb_policy: random, endpoints: {cluster: c}}}")
    assert any(p.startswith("routes.a.endpoints: required for lb_type 'endpoint'") for p in ps)
    assert any(p.startswith("routes.b.endpoints.cluster: needs server.envoy_admin") for p in ps)


def test_route_name_that_yaml_reads_as_a_boolean():
    (p,) = problems("routes: {off: {lb_policy: random, endpoints: {static: ['1.2.3.4:1']}}}")
    assert p == "routes.False: route names must be strings; quote it: 'False'"


def test_invalid_yaml_and_wrong_shapes():
    (p,) = problems("routes: [unclosed")
    assert "invalid YAML" in p
    (p,) = problems("- a\n- b\n")
    assert p == "(top level): expected a mapping, got a list"
    (p,) = problems("routes: {r: 5}")
    assert p == "routes.r: expected a mapping, got a number"


def test_plugin_import_error_and_plugin_policy():
    (p,) = problems("plugins: [no.such.module]\nroutes: {}")
    assert p.startswith("plugins[0]: cannot import 'no.such.module'")
    c = parse_config("plugins: [plugins.model_pin]\nroutes: {r: {lb_policy: test_model_pin, lb_config: {salt: x}, endpoints: {static: ['1.2.3.4:1']}}}")
    assert c.routes["r"].lb_policy == "test_model_pin"
    (p,) = problems("plugins: [plugins.model_pin]\nroutes: {r: {lb_policy: test_model_pin, lb_config: {salt: 3}, endpoints: {static: ['1.2.3.4:1']}}}")
    assert p == "routes.r.lb_config.salt: expected a string, got 3"


def test_check_config_cli_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: {r: {lb_policy: nope, endpoints: {static: ['1.2.3.4:1']}}}")
    r = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    r = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "routes.r.lb_policy: unknown policy 'nope'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_secret_values_are_never_echoed_in_errors():
    (p,) = problems("routes: {r: {lb_policy: global_least_request, lb_config: {serviceFQDN: redis, servicePort: 6379, "
                    "password: 98765431}, endpoints: {static: ['1.2.3.4:1']}}}")
    assert p == "routes.r.lb_config.password: expected a string, got <redacted>"
    assert "98765431" not in p


def test_higress_block_without_endpoints_reads_the_routes_own_cluster():
    c = parse_config("server: {envoy_admin: 'http://127.0.0.1:9901'}\n"
                     "routes: {llm: {lb_type: endpoint, lb_policy: global_least_request, "
                     "lb_config: {serviceFQDN: redis.static, servicePort: 6379, username: default, password: '123456'}}}")
    assert c.routes["llm"].endpoints.route_cluster and c.routes["llm"].endpoints.source is None


def test_kubernetes_endpoints_and_their_problems():
    c = parse_config("routes:\n"
                     "  a: {lb_policy: random, endpoints: {kubernetes: {namespace: llm, inference_pool: vllm}}}\n"
                     "  b: {lb_policy: random, endpoints: {kubernetes: {selector: {app: vllm, gpu: true}, port: 8000}}}\n"
                     "  c: {lb_policy: random, endpoints: {kubernetes: {service: vllm, port: http}}}\n")
    a, b, s = (c.routes[n].endpoints.kubernetes for n in "abc")
    assert (a.namespace, a.inference_pool) == ("llm", "vllm") and a.key == "k8s:llm/inferencepools/vllm"
    assert b.selector == (("app", "vllm"), ("gpu", "true")) and b.port == 8000
    assert s.service == "vllm" and s.port == "http"
    ps = problems("routes:\n"
                  "  a: {lb_policy: random, endpoints: {kubernetes: {inference_pool: p, service: s}}}\n"
                  "  b: {lb_policy: random, endpoints: {kubernetes: {selector: {app: x}}}}\n"
                  "  c: {lb_policy: random, endpoints: {kubernetes: {selector: {app: x}, port: http}}}\n"
                  "  d: {lb_policy: random, endpoints: {kubernetes: {service: s, port: 70000, ns: x}}}\n"
                  "  e: {lb_policy: random, endpoints: {kubernetes: {}}}\n")
    assert "routes.a.endpoints.kubernetes: give exactly one of inference_pool, selector, service (got inference_pool, service)" in ps
    assert "routes.b.endpoints.kubernetes.port: required with 'selector' (the pods' serving port)" in ps
    assert "routes.c.endpoints.kubernetes.port: a port name works with 'service' only; give a number" in ps
    assert any(p.startswith("routes.d.endpoints.kubernetes.port: expected a port number") for p in ps)
    assert any(p.startswith("routes.d.endpoints.kubernetes.ns: unknown field") for p in ps)
    assert "routes.e.endpoints.kubernetes: give exactly one of inference_pool, selector, service" in ps


def test_server_tls_health_listen_fallbacks_body_mode_and_log_format():
    c = parse_config("log_format: json\n"
                     "server: {tls: {cert: /c.pem, key: /k.pem, client_ca: /ca.pem}, health_listen: '0.0.0.0:8081', "
                     "fallback_endpoints: 3, body_mode: buffered}\n"
                     "routes: {r: {lb_policy: random, fallback_endpoints: 0, body_mode: buffered_partial, "
                     "endpoints: {static: ['1.2.3.4:1']}}}")
    assert c.log_format == "json" and c.server.tls.client_ca == "/ca.pem" and c.server.health_listen == "0.0.0.0:8081"
    assert (c.server.fallback_endpoints, c.server.body_mode) == (3, "buffered")
    assert (c.routes["r"].fallback_endpoints, c.routes["r"].body_mode) == (0, "buffered_partial")
    ps = problems("log_format: xml\nserver: {tls: {cert: /c.pem}, health_listen: nowhere, fallback_endpoints: -1}\n"
                  "routes: {r: {lb_policy: random, body_mode: streamed, fallback_endpoints: many, "
                  "endpoints: {static: ['1.2.3.4:1']}}}")
    assert "log_format: unknown format 'xml'; allowed: text, json" in ps
    assert "server.tls.key: required" in ps
    assert "server.health_listen: expected host:port, got 'nowhere'" in ps
    assert "server.fallback_endpoints: must be >= 0" in ps
    assert "routes.r.body_mode: unknown body mode 'streamed'; allowed: buffered_partial, buffered" in ps
    assert "routes.r.fallback_endpoints: expected an integer >= 0, got 'many'" in ps


def test_json_logs_are_one_object_per_line(capsys):
    import json
    import logging

    from extproc.cli import setup_logging

    setup_logging("info", "json")
    try:
        logging.getLogger("ai_lb.test").warning("route %s: %s", "llm", 'quote " and\nnewline')
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("ai_lb.test").exception("failed")
    finally:
        setup_logging("warning", "text")
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(x) for x in lines)
    assert first["message"] == 'route llm: quote " and\nnewline' and first["level"] == "warning"
    assert first["logger"] == "ai_lb.test" and first["time"].endswith("Z")
    assert second["message"] == "failed" and "ValueError: boom" in second["exception"]
