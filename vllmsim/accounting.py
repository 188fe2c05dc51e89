"""What a request adds to the engine's metrics when it prefills and when it finishes."""
from __future__ import annotations

from .metrics import EngineMetrics
from .request import Request


def record_prompt(m: EngineMetrics, req: Request) -> None:
    """vLLM's ``PromptTokenStats.update_from_output`` for a request's first token.

    ``num_cached`` are the prompt tokens not computed here (local prefix hits plus
    tokens transferred from a prefill server); when all but the last were cached, the
    last one is recomputed and vLLM counts it under ``local_cache_hit`` as well.
    """
    prompt = req.prompt_len
    num_cached = min(req.cached_tokens + req.external_tokens, prompt - 1)
    recomputed = 1 if num_cached + 1 == prompt else 0
    computed = prompt - num_cached
    req.computed_prompt_tokens = computed
    m.prompt_tokens += prompt
    m.prompt_computed += computed
    m.prompt_external += req.external_tokens
    m.prompt_local_hit += num_cached + recomputed - req.external_tokens
    m.prompt_cached += num_cached


def record_finish(m: EngineMetrics, req: Request, t: float) -> None:
    m.success[req.finish_reason or "length"] += 1
    m.num_requests += 1
    first = req.first_token_time if req.first_token_time is not None else t
    sched = req.first_scheduled if req.first_scheduled is not None else req.arrival
    m.observe("e2e_request_latency_seconds", t - req.arrival)
    m.observe("request_inference_time_seconds", t - sched)
    m.observe("request_prefill_time_seconds", first - sched)
    m.observe("request_decode_time_seconds", t - first)
    if req.num_output > 1:
        m.observe("request_time_per_output_token_seconds", (t - first) / (req.num_output - 1))
    m.observe("request_prompt_tokens", req.prompt_len)
    m.observe("request_generation_tokens", req.num_output)
    m.observe("request_max_num_generation_tokens", req.max_tokens)
    m.observe("request_params_max_tokens", req.max_tokens)
    m.observe("request_params_n", 1)
    m.observe("request_num_preemptions", req.num_preemptions)
    m.observe("request_prefill_kv_computed_tokens", req.computed_prompt_tokens)
