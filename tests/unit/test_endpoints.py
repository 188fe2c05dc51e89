from extproc.config import EndpointsConfig
from extproc.core import Endpoint, EndpointDirectory
from extproc.discovery.envoy_admin import ext_proc_hold_limit, parse_admin_clusters


def host(ip, port, **health):
    return {"address": {"socket_address": {"address": ip, "port_value": port}}, "health_status": health}


DOC = {"cluster_statuses": [
    {"name": "llm", "host_statuses": [
        host("10.0.0.1", 8000, eds_health_status="HEALTHY"),
        host("10.0.0.2", 8000, eds_health_status="HEALTHY", failed_active_health_check=True),
        host("10.0.0.3", 8000, eds_health_status="HEALTHY", failed_outlier_check=True),
        host("10.0.0.4", 8000, eds_health_status="UNHEALTHY"),
        host("10.0.0.5", 8000, eds_health_status="DRAINING"),
        host("10.0.0.6", 8000),
        {"address": {"pipe": {"path": "/tmp/x"}}},
    ]},
    {"name": "other", "host_statuses": []},
]}


def test_admin_health_flags():
    c = parse_admin_clusters(DOC)
    assert [(e.address, e.healthy) for e in c["llm"]] == [
        ("10.0.0.1:8000", True), ("10.0.0.2:8000", False), ("10.0.0.3:8000", False),
        ("10.0.0.4:8000", False), ("10.0.0.5:8000", False), ("10.0.0.6:8000", True)]
    assert c["other"] == ()


def test_directory_offers_only_healthy_and_narrows_by_static():
    d = EndpointDirectory()
    d.update_clusters(parse_admin_clusters(DOC))
    assert [e.address for e in d.candidates(EndpointsConfig(cluster="llm"))] == ["10.0.0.1:8000", "10.0.0.6:8000"]
    assert [e.address for e in d.candidates(EndpointsConfig(cluster="llm", static=("10.0.0.2:8000", "10.0.0.6:8000")))] == ["10.0.0.6:8000"]
    assert d.candidates(EndpointsConfig(cluster="missing")) == ()
    assert d.candidates(EndpointsConfig(static=("1.1.1.1:1",))) == (Endpoint("1.1.1.1:1"),)


def test_directory_cache_invalidated_on_change():
    d = EndpointDirectory()
    d.update_clusters(parse_admin_clusters(DOC))
    cfg = EndpointsConfig(cluster="llm")
    assert len(d.candidates(cfg)) == 2
    assert d.update_clusters({"llm": (Endpoint("10.0.0.9:1"),)}) is True
    assert d.candidates(cfg) == (Endpoint("10.0.0.9:1"),)
    assert d.update_clusters({"llm": (Endpoint("10.0.0.9:1"),)}) is False


def _ext_proc(**timeouts):
    return {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "ai_lb"}}, **timeouts}}


def _dump(*filters):
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "http_filters": [*filters, {"name": "envoy.filters.http.router"}]}}
    return {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
                         "static_listeners": [{"listener": {"filter_chains": [{"filters": [hcm]}]}}]}]}


def test_envoys_longest_wait_for_an_ext_proc_answer_from_its_config_dump():
    assert ext_proc_hold_limit(_dump(_ext_proc(message_timeout="0.300s", max_message_timeout="120s"))) == 120.0
    assert ext_proc_hold_limit(_dump(_ext_proc(message_timeout="0.300s"))) == 0.3     # no overrides allowed
    assert ext_proc_hold_limit(_dump(_ext_proc())) == 0.2                             # Envoy's defaults
    two = _dump(_ext_proc(max_message_timeout="120s"), _ext_proc(max_message_timeout="10.500s"))
    assert ext_proc_hold_limit(two) == 10.5                                           # the shortest counts
    assert ext_proc_hold_limit(_dump()) is None and ext_proc_hold_limit({}) is None
    assert ext_proc_hold_limit(_dump(_ext_proc(max_message_timeout={"seconds": "3", "nanos": 500000000}))) == 3.5
