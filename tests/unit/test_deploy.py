"""deploy/: the Helm chart renders (Helm's own Go engine, via helm-python-sdk) and every
manifest, rendered or example, validates: Kubernetes kinds against the Kubernetes
$K8S_VERSION schemas (kubernetes-validate, strict: unknown fields fail), custom resources
against deploy/schemas/. Plus what a schema cannot see: selectors that match, probes on
the gRPC health services, and a ConfigMap that ai-lb itself accepts."""

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc.runtime import parse_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "ai-lb"
EXAMPLES = ROOT / "deploy" / "examples"
SCHEMAS = ROOT / "deploy" / "schemas"
K8S_VERSION = "1.33.0"  # the Kubernetes version the manifests are validated against
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor",
        ("networking.istio.io/v1alpha3", "EnvoyFilter"): "envoyfilter",
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"): "envoyextensionpolicy",
        ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool"}

VALUE_SETS = {
    "default": {},
    "tls-mtls": {"tls": {"enabled": True, "secretName": "ai-lb-tls", "mtls": True}},
    "external-redis-minimal": {"redis": {"enabled": False, "url": "redis://redis.infra:6379/2"},
                               "serviceMonitor": {"enabled": False}, "podDisruptionBudget": {"enabled": False},
                               "rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ai-lb"}},
    "higress-style-routes": {"replicaCount": 3, "config": {"routes": {"llm": {
        "lb_policy": "global_least_request", "lb_config": {"serviceFQDN": "redis.static", "servicePort": 6379}}}}},
}


def render(values: dict) -> list[dict]:
    import helm_python as helm
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="ai-lb", namespace="ai-lb", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def validate(doc: dict) -> None:
    crd = CRDS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        schema = yaml.safe_load((SCHEMAS / f"{crd}.schema.yaml").read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_renders_and_every_manifest_validates(name):
    docs = render(VALUE_SETS[name])
    assert docs
    for d in docs:
        validate(d)
    k = by_kind(docs)
    (cm,) = k["ConfigMap"]
    cfg = parse_config(cm["data"]["ai-lb.yaml"], source="configmap")  # ai-lb accepts what the chart writes
    (dep,) = [d for d in k["Deployment"] if d["metadata"]["name"] == "ai-lb"]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["livenessProbe"]["grpc"]["service"] == "liveness" and c["readinessProbe"]["grpc"]["service"] == "readiness"
    health = {p["name"]: p["containerPort"] for p in c["ports"]}["health"]
    assert c["readinessProbe"]["grpc"]["port"] == health and cfg.server.health_listen.endswith(f":{health}")
    assert dep["spec"]["replicas"] == VALUE_SETS[name].get("replicaCount", 2)
    labels = pod["metadata"]["labels"]
    (svc,) = [s for s in k["Service"] if s["metadata"]["name"] == "ai-lb"]
    assert svc["spec"]["selector"].items() <= labels.items()
    for pdb in k.get("PodDisruptionBudget", []):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for sm in k.get("ServiceMonitor", []):
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    for role in k.get("Role", []):  # read-only
        assert all(set(r["verbs"]) == {"get", "list", "watch"} for r in role["rules"])
    if VALUE_SETS[name].get("redis", {}).get("enabled", True):
        redis_svc = [s for s in k["Service"] if s["metadata"]["name"] == "ai-lb-redis"]
        assert redis_svc and cfg.store == "redis://ai-lb-redis:6379/0"
    if name == "tls-mtls":
        assert cfg.server.tls is not None and cfg.server.tls.client_ca == "/etc/ai-lb/tls/ca.crt"
        assert any(v.get("secret", {}).get("secretName") == "ai-lb-tls" for v in pod["spec"]["volumes"])
    if name == "external-redis-minimal":
        assert {"ServiceMonitor", "PodDisruptionBudget", "Role"}.isdisjoint(k) and cfg.store.endswith("infra:6379/2")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for d in docs:
        validate(d)


def test_validation_is_not_vacuous():
    """Each schema rejects a manifest with a misplaced field, and Kubernetes kinds too."""
    docs = render({})
    sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
    sm["spec"]["endpoints"][0]["prot"] = sm["spec"]["endpoints"][0].pop("port")
    with pytest.raises(jsonschema.ValidationError):
        validate(sm)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    pool = next(yaml.safe_load_all((EXAMPLES / "inferencepool.yaml").read_text()))
    del pool["spec"]["endpointPickerRef"]["port"]  # a Service ref needs a port (the CRD's rule)
    with pytest.raises(jsonschema.ValidationError):
        validate(pool)


def test_helm_lint_is_clean():
    import helm_python as helm

    result = helm.lint(str(CHART))
    assert result["errors"] == [] and not [m for m in result["messages"] if m["severity"] > 1], result
