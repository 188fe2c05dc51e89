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
    assert any(p.startswith("routes.r.endpoints.dns: unknown field; allowed: cluster, kubernetes, registered, roles, static") for p in ps)


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
    assert "store: expected 'memory' or a Redis URL: unsupported scheme in 'mysql://x'" in text
    assert "log_level: unknown level 'loud'" in text
    assert "server.discovery_interval: expected a number, got 'fast'" in text
    assert "routes.r.enabled: expected true or false" in text
    assert "routes.r.endpoints.static: expected a list of strings" in text
    # One server field's type error does not hide the others' range checks.
    assert "server.listen: expected host:port, got 'nowhere'" in text
    assert "server.max_body_bytes: must be > 0" in text


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
    assert p == "routes.off: YAML reads `off` as a boolean; quote the name, e.g. 'off'"
    (p,) = problems("routes: {1: {lb_policy: random, endpoints: {static: ['1.2.3.4:1']}}}")
    assert p == "routes.1: YAML reads `1` as a number; quote the name, e.g. '1'"


def test_invalid_yaml_and_wrong_shapes():
    (p,) = problems("routes: [unclosed")
    assert "invalid YAML" in p
    (p,) = problems("- a\n- b\n")
    assert p == "(top level): expected a mapping, got a list"
    (p,) = problems("routes: {r: 5}")
    assert p == "routes.r: expected a mapping, got a number"


def test_plugin_import_error_and_plugin_policy():
    (p,) = problems("plugins: [no.such.module]\nroutes: {r: {lb_policy: random, endpoints: {static: ['1.2.3.4:1']}}}")
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


# -- hardening: secrets, empty files, strict YAML, store URLs ----------------------------
ONE_ROUTE = "routes: {r: {lb_policy: random, endpoints: {static: ['1.2.3.4:1']}}}\n"


def test_yaml_errors_give_position_and_problem_not_the_line():
    (p,) = problems("store: redis://:hunter2@db:6379/0\nroutes: {r: {lb_policy: [unclosed\n")
    assert "hunter2" not in p and "<unicode string>" not in p
    assert p.startswith("line 3, column 1: invalid YAML: ")
    (p,) = problems("routes:\n  r: {lb_policy: random}\n   store: redis://:hunter2@x\n")
    assert "hunter2" not in p and p.startswith("line 3, column ")


def test_binary_and_nul_files_are_described_not_dumped():
    with pytest.raises(ConfigError) as ei:
        parse_config(b"\x89PNG\r\n\x1a\n\x00\x00secret")
    (p,) = ei.value.problems
    assert p.startswith("not a UTF-8 text file (byte 0x89 at offset 0)") and "PNG" not in p
    (p,) = problems("routes: {}\x00\x01 password")
    assert "unacceptable character #x0000" in p and "password" not in p


def test_empty_file_and_no_routes_are_errors():
    for text in ("", "\n\n# only a comment\n"):
        (p,) = problems(text)
        assert p.startswith("(top level): the config is empty")
    for text in ("routes: {}", "server: {}", "routes:\n"):
        (p,) = problems(text)
        assert p.startswith("routes: no routes: every request would fall back")


def test_duplicate_keys_are_rejected_at_any_depth():
    (p,) = problems("routes: {r: {lb_policy: random, endpoints: {static: ['1.2.3.4:1']}}}\n"
                    "routes: {s: {lb_policy: random, endpoints: {static: ['1.2.3.4:1']}}}\n")
    assert p == "line 2, column 1: invalid YAML: duplicate key 'routes' (first given on line 1)"
    (p,) = problems("routes:\n  r:\n    lb_policy: random\n    lb_policy: round_robin\n"
                    "    endpoints: {static: ['1.2.3.4:1']}\n")
    assert p.startswith("line 4, column 5: invalid YAML: duplicate key 'lb_policy'")
    # YAML merge keys are not duplicates: an explicit key overrides a merged one.
    c = parse_config("routes:\n  a: &base {lb_policy: random, endpoints: {static: ['1.2.3.4:1']}}\n"
                     "  b: {<<: *base, lb_policy: round_robin}\n")
    assert c.routes["b"].lb_policy == "round_robin" and c.routes["b"].endpoints.static == ("1.2.3.4:1",)


def test_missing_lb_config_field_does_not_hide_range_errors():
    ps = problems("routes: {m: {lb_type: cluster, lb_policy: cluster_metrics, "
                  "lb_config: {service_list: [a], rate_limit: 5, queue_size: 0}}}")
    assert "routes.m.lb_config.mode: required" in ps
    assert any(p.startswith("routes.m.lb_config.rate_limit: must be in (0, 1]") for p in ps)
    assert any(p.startswith("routes.m.lb_config.queue_size:") for p in ps)
    assert not any("service_list" in p for p in ps)


@pytest.mark.parametrize("url,msg", [
    ("redis://host:notaport/x", "the port is not a number"),
    ("redis://db:99999/0", "the port is not a number"),
    ("redis://", "no host"),
    ("redis://:s3cret@/0", "no host"),
    ("rediss://:s3cret@", "no host"),
    ("redis://db:6379/x", "the database must be a number"),
    ("unix://", "no socket path"),
    ("unix:///tmp/r.sock?db=one", "the database must be a number"),
    ("redis://db/0?ssl_ca_certs=/x", "unknown parameter(s) ssl_ca_certs"),
    ("rediss://db/0?ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs: no such file"),
    ("rediss://db/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
    ("http://db:6379", "unsupported scheme"),
])
def test_store_urls_are_checked_without_echoing_the_password(url, msg):
    (p,) = problems(f"store: '{url}'\n" + ONE_ROUTE)
    assert p.startswith("store: expected 'memory' or a Redis URL") and msg in p, p
    assert "s3cret" not in p


def test_store_url_forms_that_serve_can_use(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    for url in ("redis://db", "redis://u:p@db:6380/2", "rediss://:p@db:6380/1", f"rediss://db?ssl_ca_certs={ca}",
                "unix:///run/redis.sock", "unix://:p@/run/redis.sock?db=3"):
        assert parse_config(f"store: '{url}'\n" + ONE_ROUTE).store == url


def test_check_config_output_never_shows_the_password(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("store: redis://:hunter2@db:notaport/0\n" + ONE_ROUTE)
    r = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "hunter2" not in r.stderr + r.stdout
    assert f"{f}: store: expected 'memory' or a Redis URL: 'redis://:***@db:notaport/0': the port" in r.stderr
    f.write_text("store: redis://:hunter2@db/0\nroutes: {r: {lb_policy: random, endpoints: [\n")
    r = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "hunter2" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"{f}: line 3, column 1: invalid YAML") and line.count(str(f)) == 1, line
    f.write_text("")
    r = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "the config is empty" in r.stderr
