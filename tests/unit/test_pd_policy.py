"""The pd policy: one decision, two endpoints (the decode destination and the prefill server
in x-prefiller-host-port), both counted in flight and released once; pools composed from
the catalog's policies, each with its own state; roles from config, registration or labels."""

import asyncio
import textwrap

import pytest

from extproc.config import ConfigError, EndpointsConfig
from extproc.core import Endpoint, EndpointDirectory, Pick
from extproc.core.context import RequestContext
from extproc.discovery.k8s_objects import pod_endpoint
from extproc.envoy.answers import DEST_HEADER, PREFILL_HEADER
from extproc.envoy.processor import Processor
from extproc.policies import Policy, registry
from extproc.runtime import Runtime, parse_config
from extproc.telemetry import Telemetry
from proc_stream import Stream
from proc_stream import headers_msg as proc_headers

P, D1, D2, M = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"


def headers_msg(route="llm", **hdrs):
    return proc_headers(route, eos=True, **hdrs)


def mutation(resp):
    m = resp.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in m.set_headers}, list(m.remove_headers)


class Leg(Policy):
    """Picks the first candidate and keeps per-request state: what each pool saw."""

    name = "test_pd_leg"
    seen: list = []

    async def pick(self, ctx, candidates):
        assert ctx.policy_state is None  # a pool never sees the other pool's state
        ctx.policy_state = (self.env.route.name, candidates[0].address)
        return candidates[0]

    def on_first_token(self, ctx, ttft):
        Leg.seen.append(("first", self.env.route.name, ctx.policy_state, ctx.endpoint.address))

    def on_done(self, ctx):
        Leg.seen.append(("done", self.env.route.name, ctx.policy_state, ctx.endpoint.address))


registry.register(Leg)


def config(pools="", roles=None, fallbacks=0):
    roles = roles or {"prefill": [P], "decode": [D1, D2], "mixed": [M]}
    return parse_config(textwrap.dedent(f"""
        routes:
          llm:
            lb_policy: pd
            fallback_endpoints: {fallbacks}
            lb_config: {{{pools or "prefill: {lb_policy: round_robin}, decode: {lb_policy: round_robin}"}}}
            endpoints: {{roles: {roles}}}
        """))


async def make(cfg):
    tel = Telemetry(fallback_log_interval=0)
    rt = Runtime()
    await rt.apply(cfg)
    return Processor(rt, tel, rt.load), rt


@pytest.mark.asyncio
async def test_decode_is_the_destination_and_the_prefill_server_travels_in_the_header():
    p, rt = await make(config())
    seen = []
    for _ in range(3):  # round robin over D1, D2, M
        s = Stream([headers_msg(**{PREFILL_HEADER: "6.6.6.6:1"})], hold=True)
        task = asyncio.create_task(p.Process(None, s))
        await asyncio.sleep(0.01)
        sets, removed = mutation(s.out[0])
        dest = sets[DEST_HEADER].split(",")[0]
        if dest == M:  # a mixed server computes its prompt itself: no prefill server, the client's removed
            assert PREFILL_HEADER not in sets and PREFILL_HEADER in removed
            assert rt.load.inflight.snapshot() == {M: 1}
        else:  # the client's value is overwritten: only ai-lb names the prefill server
            assert sets[PREFILL_HEADER] == P and dest in (D1, D2)
            assert rt.load.inflight.snapshot() == {dest: 1, P: 1}  # both counted in flight
        s.hold.set()
        await task
        assert rt.load.inflight.snapshot() == {}  # ... and both released, once
        seen.append(dest)
    assert sorted(seen) == sorted([D1, D2, M])
    st = rt.routes["llm"].policy.stats
    assert st["disaggregated"] == 2 and st["mixed_destination"] == 1


@pytest.mark.asyncio
async def test_each_pool_keeps_its_own_state_and_hooks():
    Leg.seen = []
    p, rt = await make(config("prefill: {lb_policy: test_pd_leg}, decode: {lb_policy: test_pd_leg}",
                              roles={"prefill": [P], "decode": [D1]}))
    pol = rt.routes["llm"].policy
    ctx = RequestContext("llm", headers={})
    d = await pol.pick(ctx, rt.routes["llm"].candidates(rt.directory))
    assert isinstance(d, Pick) and d.endpoint.address == D1 and d.also == (("prefill", Endpoint(P, True, "prefill")),)
    ctx.endpoint = d.endpoint
    pol.on_first_token(ctx, 0.1)
    pol.on_done(ctx)
    assert Leg.seen == [("first", "llm/prefill", ("llm/prefill", P), P), ("first", "llm/decode", ("llm/decode", D1), D1),
                        ("done", "llm/prefill", ("llm/prefill", P), P), ("done", "llm/decode", ("llm/decode", D1), D1)]
    assert ctx.endpoint.address == D1  # hooks give the context back as they found it


@pytest.mark.asyncio
async def test_without_a_prefill_server_or_a_decode_server():
    p, rt = await make(config(roles={"decode": [D1]}))
    s = Stream([headers_msg()])
    await p.Process(None, s)
    sets, removed = mutation(s.out[0])
    assert sets[DEST_HEADER] == D1 and PREFILL_HEADER not in sets and PREFILL_HEADER in removed
    assert rt.routes["llm"].policy.stats["no_prefill_endpoint"] == 1
    p, rt = await make(config(roles={"prefill": [P]}))  # nothing can be a destination: Envoy's own LB
    s = Stream([headers_msg()])
    await p.Process(None, s)
    sets, removed = mutation(s.out[0])
    assert DEST_HEADER not in sets and removed == [DEST_HEADER, PREFILL_HEADER]
    assert p.telemetry.fallback_count("llm", "no_decode_endpoint") == 1


@pytest.mark.asyncio
async def test_a_prefill_pick_of_the_destination_itself_is_dropped():
    pools = "prefill: {lb_policy: round_robin, roles: [decode]}, decode: {lb_policy: round_robin, roles: [decode]}"
    p, rt = await make(config(pools, roles={"decode": [D1]}))
    ctx = RequestContext("llm", headers={})
    d = await rt.routes["llm"].policy.pick(ctx, rt.routes["llm"].candidates(rt.directory))
    assert d.endpoint.address == D1 and d.also == ()
    assert rt.routes["llm"].policy.stats["prefill_local"] == 1


@pytest.mark.asyncio
async def test_retries_stay_in_the_decode_pool():
    p, rt = await make(config(roles={"prefill": [P], "decode": [D1, D2], "mixed": [M]}, fallbacks=2))
    ctx = RequestContext("llm", headers={})
    d = await rt.routes["llm"].policy.pick(ctx, rt.routes["llm"].candidates(rt.directory))
    assert P not in {e.address for e in d.fallbacks} and len(d.fallbacks) == 2
    assert d.endpoint not in d.fallbacks


@pytest.mark.asyncio
async def test_pool_events_are_exported_with_their_prefix():
    p, rt = await make(config("prefill: {lb_policy: cache_aware}"))
    st = rt.routes["llm"].policy.stats
    assert {"prefill_cache", "prefill_imbalanced"} <= set(st)  # cache_aware's own counters
    assert rt.routes["llm"].policy.needs_body  # the prefill pool reads the prompt: so does the route


def test_config_errors_name_the_pool_and_the_field():
    with pytest.raises(ConfigError) as e:
        parse_config(textwrap.dedent("""
            routes:
              llm:
                lb_policy: pd
                lb_config:
                  prefill: {lb_policy: pd, extra: 1}
                  decode: {lb_config: {max_candidates: 1}, roles: [sideways]}
                endpoints: {registered: true, roles: {prefill: [not-an-address], leader: [1.2.3.4:5]}}
            """))
    ps = e.value.problems
    assert any(x.startswith("routes.llm.lb_config.prefill.lb_policy: unknown policy 'pd' for the prefill pool")
               for x in ps)
    assert "routes.llm.lb_config.prefill.extra: unknown field; allowed: lb_config, lb_policy, roles" in ps
    assert "routes.llm.lb_config.decode.lb_config.max_candidates: must be >= 2" in ps
    assert any(x.startswith("routes.llm.lb_config.decode.roles: expected a non-empty list") for x in ps)
    assert "routes.llm.endpoints.roles.prefill[0]: expected ip:port, got 'not-an-address'" in ps
    assert any(x.startswith("routes.llm.endpoints.roles.leader: unknown role") for x in ps)
    with pytest.raises(ConfigError) as e:
        parse_config("routes: {llm: {lb_policy: pd, endpoints: {registered: true}}}")
    assert e.value.problems == ["routes.llm.endpoints.registered: needs the top-level 'registration' block "
                                "(the registry and its health checks)"]


def test_config_roles_win_over_the_sources_and_add_what_no_source_names():
    d = EndpointDirectory()
    d.update_clusters({"llm": (Endpoint(D1, True, "mixed"), Endpoint(D2, False, "prefill"))})
    cfg = EndpointsConfig(cluster="llm", roles=((D1, "decode"), (P, "prefill")))
    assert d.all_known(cfg) == (Endpoint(D1, True, "decode"), Endpoint(D2, False, "prefill"), Endpoint(P, True, "prefill"))
    assert [e.address for e in d.candidates(cfg)] == [D1, P]


def test_a_pod_declares_its_role_with_llm_d_label():
    def pod(role):
        return {"metadata": {"labels": {"llm-d.ai/role": role}}, "status": {
            "podIP": "10.1.1.1", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert [pod_endpoint(pod(r), 8000).role for r in ("prefill", "decode", "both", "other")] == \
        ["prefill", "decode", "mixed", ""]


@pytest.mark.asyncio
async def test_other_policies_are_never_offered_a_prefill_server():
    rt = Runtime()
    await rt.apply(parse_config(f"routes: {{llm: {{lb_policy: round_robin, endpoints: {{static: ['{D1}'], "
                                f"roles: {{prefill: ['{P}'], mixed: ['{M}']}}}}}}}}"))
    assert [e.address for e in rt.routes["llm"].candidates(rt.directory)] == [D1, M]
