"""Which systems ``ai-lb bench`` knows, the default list, and system specs.

A spec names one system: ``envoy-rr``, ``envoy-lr``, ``sglang-router``, ``vllm-router``,
``oracle``, or ``ai-lb:POLICY`` with an optional ``lb_config`` as inline JSON, e.g.
``ai-lb:fd_metrics_score{"waiting-weight":5}``. Without one, the policy's bench default
below applies, then ``--ai-lb-config FILE`` (a YAML/JSON mapping policy -> lb_config)
overrides it, then the inline JSON overrides that. An inline ``"queue"`` key is the
route's gateway queue (docs/queue.md), not lb_config:
``ai-lb:least_request{"queue":{"saturation":{"max_inflight":8},"max_wait":30}}``.

The default list comes from the tables here: every ai-lb policy in ``AI_LB_POLICIES``,
then the peers. A policy the registry has but these tables do not name makes
``tests/unit/test_bench_catalog.py`` fail, so new policies are not forgotten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# ai-lb policies in the default run, with the lb_config the bench gives them.
AI_LB_POLICIES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("round_robin", {}),
    ("least_request", {}),
    ("request_num", {}),
    ("power_of_two", {}),
    ("process_tokens", {}),
    ("fd_metrics_score", {}),
    ("least_kv_cache", {}),
    ("endpoint_metrics", {"metric_policy": "default"}),
    ("global_least_request", {}),
    ("prefix_cache", {}),
    ("cache_aware", {}),
    ("estimated_ttft", {}),
    ("precise_prefix_cache", {}),  # simulated fleets get their KV-event endpoints filled in
)
# Policies that read the engines' KV-cache events: a simulated fleet is started with vLLM's
# --kv-events-config and the route told where each backend's events arrive (SimFleet.kv_lb_config);
# on --backend-urls the operator names them in --ai-lb-config.
KV_EVENTS_POLICIES = ("precise_prefix_cache",)
# Registered policies left out of the default run, and why.
AI_LB_NOT_DEFAULT = {
    "random": "uniform random: round robin's expectation with more variance",
    "metrics_based": "an alias of endpoint_metrics",
    "scheduler": "the framework itself: a composition given in lb_config (use ai-lb:scheduler{...})",
    "cluster_metrics": "chooses Envoy clusters, not endpoints (lb_type: cluster)",
    "pd": "prefill/decode needs a fleet split by role and a sidecar per decode server: the ai-lb-pd system",
}
PEERS = {
    "envoy-rr": "the reference Envoy, its own round robin (no ext_proc)",
    "envoy-lr": "the reference Envoy, its own least request (no ext_proc)",
    "sglang-router": "SGLang Model Gateway (PyPI sglang-router), cache_aware",
    "vllm-router": "vLLM router (PyPI vllm-router), cache_aware",
    "oracle": "knows every simulated server's true cache and queue (simulator backends only)",
    "ai-lb-pd[:P]": "prefill/decode: ai-lb's pd route, P of the simulated servers prefill (default a quarter), "
                    "the others decode behind a PD sidecar each (not in the default list)",
}
NOT_DEFAULT_PEERS = ("ai-lb-pd[:P]",)
LEADING_PEERS = ("envoy-rr", "envoy-lr")


def default_systems() -> list[str]:
    return [*LEADING_PEERS, *(f"ai-lb:{p}" for p, _ in AI_LB_POLICIES),
            *(p for p in PEERS if p not in LEADING_PEERS and p not in NOT_DEFAULT_PEERS)]


def describe(width: int = 100) -> str:
    import textwrap

    rows = [*PEERS.items(), ("ai-lb:POLICY[{json}]", "the reference Envoy + ai-lb with that policy (inline "
                             "lb_config optional; its \"queue\" key is the route's gateway queue): " + ", ".join(p for p, _ in AI_LB_POLICIES))]
    return "\n".join(textwrap.fill(about, width, initial_indent=f"  {n:<23} ", subsequent_indent=" " * 26,
                                   break_on_hyphens=False) for n, about in rows)


def split_specs(text: str) -> list[str]:
    """Comma-separated specs; commas inside an inline ``{...}`` config do not split."""
    out, cur, depth = [], "", 0
    for ch in text:
        if ch == "," and depth == 0:
            if cur.strip():
                out.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "{") - (ch == "}")
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_ai_lb(spec: str) -> tuple[str, dict[str, Any] | None]:
    """``ai-lb:POLICY{json}`` -> (policy, inline lb_config or None)."""
    from .base import split_inline

    return split_inline(spec, spec.split(":", 1)[1])


def load_ai_lb_config(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """``--ai-lb-config FILE``: policy -> lb_config (YAML or JSON)."""
    if not path:
        return {}
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise ValueError(f"{path}: expected a mapping of policy name -> lb_config mapping")
    return doc


def ai_lb_config(policy: str, inline: dict[str, Any] | None, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cfg = dict(dict(AI_LB_POLICIES).get(policy, {}))
    cfg.update(overrides.get(policy, {}))
    cfg.update(inline or {})
    return cfg


def fleet_roles(spec: str, n: int) -> list[str] | None:
    """The roles a simulated fleet must be started with for ``spec`` (None: all mixed)."""
    from . import pd

    return pd.fleet_roles(spec, n) if spec.startswith(pd.SPEC) else None


def make_system(spec: str, store: str = "memory", overrides: dict[str, dict[str, Any]] | None = None):
    from . import EnvoyAiLb, EnvoyNative, Oracle, SglangRouter, VllmRouter, pd

    if spec == "envoy-rr":
        return EnvoyNative("round_robin")
    if spec == "envoy-lr":
        return EnvoyNative("least_request")
    if spec.startswith(pd.SPEC):
        _, inline = pd.parse_spec(spec)
        return pd.EnvoyAiLbPd({**(overrides or {}).get("pd", {}), **inline}, store=store)
    if spec.startswith("ai-lb:"):
        pol, inline = parse_ai_lb(spec)
        return EnvoyAiLb(pol, ai_lb_config(pol, inline, overrides or {}), store=store)
    if spec == "sglang-router":
        return SglangRouter()
    if spec == "vllm-router":
        return VllmRouter()
    if spec == "oracle":
        return Oracle()
    raise ValueError(f"unknown system {spec!r}; known: {', '.join(PEERS)}, ai-lb:POLICY")
