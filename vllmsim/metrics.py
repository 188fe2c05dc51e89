"""Prometheus text for one simulated server, with vLLM 0.32's exact names and labels.

Hand-formatted rather than via prometheus_client because a gateway scrapes every server
every 50-100 ms: each histogram caches its rendered text until its next observation,
so an idle scrape costs a few string joins.  The output parses with
``prometheus_client.parser.text_string_to_metric_families``.

Times observed here are *simulated* seconds (see engine.py), so histograms read the same
whatever the time-scale factor.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from typing import Sequence

LATENCY_BUCKETS_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                        2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                       5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS_REQ = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                       50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
ITERATION_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
                     8192.0, 16384.0)
N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)
PREEMPT_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0)
SGLANG_LATENCY_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0,
                          60.0, 80.0, 100.0, 200.0, 400.0)

FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    return repr(float(v))


class Histogram:
    """Cumulative-bucket histogram that renders itself lazily."""

    __slots__ = ("name", "help", "buckets", "pre", "post", "counts", "sum", "count", "_text",
                 "_created")

    def __init__(self, name: str, help_: str, buckets: Sequence[float], pre: str, post: str,
                 created: float) -> None:
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self.pre, self.post = pre, post  # label text before/after "le" (labels are sorted)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._text: str | None = None
        self._created = created

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1
        self._text = None

    def text(self) -> str:
        if self._text is None:
            n, pre, post = self.name, self.pre, self.post
            sep = "," if pre else ""
            labels = f"{pre}{sep}{post}" if post else pre
            lines = [f"# HELP {n} {self.help}", f"# TYPE {n} histogram"]
            cum = 0
            for le, c in zip(self.buckets, self.counts):
                cum += c
                lines.append(f'{n}_bucket{{{pre}{sep}le="{le!r}",{post}}} {cum}.0')
            cum += self.counts[-1]
            lines.append(f'{n}_bucket{{{pre}{sep}le="+Inf",{post}}} {cum}.0')
            lines.append(f"{n}_count{{{labels}}} {self.count}.0")
            lines.append(f"{n}_sum{{{labels}}} {_num(self.sum)}")
            lines.append(f"# HELP {n}_created {self.help}")
            lines.append(f"# TYPE {n}_created gauge")
            lines.append(f"{n}_created{{{labels}}} {_num(self._created)}")
            self._text = "\n".join(lines) + "\n"
        return self._text


class EngineMetrics:
    """Counters/histograms of one engine plus the Prometheus renderer.

    ``flavor`` "vllm" renders vLLM 0.32 names; "sglang" renders SGLang's names from the
    same statistics (so a gateway's SGLang scraper can be tested without SGLang).
    """

    def __init__(self, model_name: str, *, block_size: int, num_gpu_blocks: int,
                 enable_prefix_caching: bool = True, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 1024, flavor: str = "vllm", legacy_gpu_cache: bool = False,
                 lora_enabled: bool = False, max_loras: int = 1, engine_id: str = "0") -> None:
        if flavor not in ("vllm", "sglang"):
            raise ValueError(f"unknown metrics flavor {flavor!r}")
        self.flavor = flavor
        self.legacy_gpu_cache = legacy_gpu_cache
        self.lora_enabled = lora_enabled
        self.max_loras = max_loras
        self.model_name = model_name
        self.created = time.time()
        m = _esc(model_name)
        self.labels = f'engine="{engine_id}",model_name="{m}"'
        self._engine_pre = f'engine="{engine_id}"'
        self._model_post = f'model_name="{m}"'
        self._engine_id = engine_id
        # counters (tokens unless noted)
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens = 0
        self.prompt_computed = 0   # prompt_tokens_by_source{source="local_compute"}
        self.prompt_local_hit = 0  # ... "local_cache_hit"
        self.prompt_external = 0   # ... "external_kv_transfer"
        self.prompt_cached = 0     # prompt_tokens_cached (local + external)
        self.generation_tokens = 0
        self.preemptions = 0
        self.success = dict.fromkeys(FINISHED_REASONS, 0)
        self.num_requests = 0
        self.hist: dict[str, Histogram] = {}
        self._static_cache_info = self._cache_config_info(
            block_size, num_gpu_blocks, enable_prefix_caching, gpu_memory_utilization, max_num_seqs)
        if flavor == "vllm":
            spec = [
                ("request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS),
                ("request_generation_tokens", "Number of generation tokens processed.", TOKEN_BUCKETS),
                ("iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_BUCKETS),
                ("request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.", TOKEN_BUCKETS),
                ("request_params_n", "Histogram of the n request parameter.", N_BUCKETS),
                ("request_params_max_tokens", "Histogram of the max_tokens request parameter.", TOKEN_BUCKETS),
                ("time_to_first_token_seconds", "Histogram of time to first token in seconds.", LATENCY_BUCKETS_TTFT),
                ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", LATENCY_BUCKETS_ITL),
                ("request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.", LATENCY_BUCKETS_ITL),
                ("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS_REQ),
                ("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS_REQ),
                ("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", LATENCY_BUCKETS_REQ),
                ("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", LATENCY_BUCKETS_REQ),
                ("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS_REQ),
                ("request_num_preemptions", "Histogram of the number of times a request was preempted.", PREEMPT_BUCKETS),
                ("request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during prefill (excluding cached tokens).", TOKEN_BUCKETS),
            ]
            for key, help_, buckets in spec:
                self.hist[key] = Histogram("vllm:" + key, help_, buckets, self._engine_pre,
                                           self._model_post, self.created)
        else:
            pre = 'engine_type="unified"'
            post = f'model_name="{m}",pp_rank="0",tp_rank="0"'
            self._sg_labels = f"{pre},{post}"
            for key, help_ in (
                ("time_to_first_token_seconds", "Histogram of time to first token in seconds."),
                ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
                ("e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds"),
                ("queue_time_seconds", "Histogram of queueing time in seconds."),
            ):
                self.hist[key] = Histogram("sglang:" + key, help_, SGLANG_LATENCY_BUCKETS, pre, post,
                                           self.created)

    # ----------------------------------------------------------------- updates
    def observe(self, key: str, value: float) -> None:
        h = self.hist.get(key)
        if h is not None:
            h.observe(value)

    # ----------------------------------------------------------------- render
    def _cache_config_info(self, block_size: int, num_gpu_blocks: int, prefix: bool,
                           util: float, max_num_seqs: int) -> str:
        tokens = block_size * num_gpu_blocks
        labels = {
            "_block_size_resolved": "True", "block_size": str(block_size), "cache_dtype": "auto",
            "cache_hit_alignment_tokens": "None", "effective_attention_block_size": str(block_size),
            "enable_mamba_shared_prefix_checkpoint": "False",
            "enable_prefix_caching": str(bool(prefix)), "engine": self._engine_id,
            "gpu_memory_utilization": str(util), "hash_block_size": "None",
            "is_attention_free": "False", "kv_cache_dtype_skip_layers": "[]",
            "kv_cache_layout": "None", "kv_cache_max_concurrency": _num(tokens / 8192),
            "kv_cache_memory_bytes": str(tokens * 131072), "kv_cache_size_tokens": str(tokens),
            "kv_offloading_backend": "native", "kv_offloading_size": "None",
            "kv_sharing_fast_prefill": "False", "mamba_block_size": "None",
            "mamba_cache_dtype": "auto", "mamba_cache_mode": "none",
            "mamba_page_size_padded": "None", "mamba_ssm_cache_dtype": "auto",
            "num_cpu_blocks": "None", "num_gpu_blocks": str(num_gpu_blocks),
            "num_gpu_blocks_override": "None", "prefix_cache_retention_interval": "0",
            "prefix_caching_hash_algo": "sha256", "prefix_match_unit": "None",
            "replayssm_buffer_len": "16", "skip_page_size_padded": "None", "sliding_window": "None",
            "swa_bounded_replay": "True", "use_kda_recoverssm": "False", "use_replayssm": "False",
            "user_specified_block_size": "True",
        }
        body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        return ("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
                "# TYPE vllm:cache_config_info gauge\n"
                f"vllm:cache_config_info{{{body}}} 1.0\n")

    def _gauge(self, name: str, help_: str, value: float, labels: str | None = None) -> str:
        return (f"# HELP {name} {help_}\n# TYPE {name} gauge\n"
                f"{name}{{{labels if labels is not None else self.labels}}} {_num(value)}\n")

    def _counter(self, name: str, help_: str, value: float) -> str:
        lab = self.labels
        return (f"# HELP {name}_total {help_}\n# TYPE {name}_total counter\n"
                f"{name}_total{{{lab}}} {_num(value)}\n"
                f"# HELP {name}_created {help_}\n# TYPE {name}_created gauge\n"
                f"{name}_created{{{lab}}} {_num(self.created)}\n")

    def render(self, *, running: int, waiting: int, kv_usage: float, deferred: int = 0,
               used_tokens: int = 0,
               total_tokens: int = 1, running_loras: Sequence[str] = (),
               waiting_loras: Sequence[str] = (), gen_throughput: float = 0.0) -> str:
        """The /metrics page body."""
        if self.flavor == "sglang":
            return self._render_sglang(running, waiting, used_tokens, total_tokens, gen_throughput)
        lab = self.labels
        out = [
            self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running),
            self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            "# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.\n"
            "# TYPE vllm:num_requests_waiting_by_reason gauge\n"
            f'vllm:num_requests_waiting_by_reason{{{lab},reason="capacity"}} {_num(waiting - deferred)}\n'
            f'vllm:num_requests_waiting_by_reason{{{lab},reason="deferred"}} {_num(deferred)}\n',
            self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage),
        ]
        if self.legacy_gpu_cache:
            out.append(self._gauge("vllm:gpu_cache_usage_perc",
                                   "GPU KV-cache usage. 1 means 100 percent usage.", kv_usage))
        if self.lora_enabled:
            ll = (f'max_lora="{self.max_loras}",running_lora_adapters="{_esc(",".join(running_loras))}",'
                  f'waiting_lora_adapters="{_esc(",".join(waiting_loras))}"')
            out.append(self._gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                                   time.time(), ll))
        out += [
            self._counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", self.prefix_queries),
            self._counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", self.prefix_hits),
            self._counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", self.preemptions),
            self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
            "# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.\n"
            "# TYPE vllm:prompt_tokens_by_source_total counter\n"
            f'vllm:prompt_tokens_by_source_total{{{lab},source="local_compute"}} {_num(self.prompt_computed)}\n'
            f'vllm:prompt_tokens_by_source_total{{{lab},source="local_cache_hit"}} {_num(self.prompt_local_hit)}\n'
            f'vllm:prompt_tokens_by_source_total{{{lab},source="external_kv_transfer"}} {_num(self.prompt_external)}\n'
            "# HELP vllm:prompt_tokens_by_source_created Number of prompt tokens by source.\n"
            "# TYPE vllm:prompt_tokens_by_source_created gauge\n"
            + "".join(f'vllm:prompt_tokens_by_source_created{{{lab},source="{src}"}} {_num(self.created)}\n'
                      for src in ("local_compute", "local_cache_hit", "external_kv_transfer")),
            self._counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).", self.prompt_cached),
            self._counter("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens),
        ]
        pre, post = self._engine_pre, self._model_post
        lines = ["# HELP vllm:request_success_total Count of successfully processed requests.",
                 "# TYPE vllm:request_success_total counter"]
        for reason, n in self.success.items():
            lines.append(f'vllm:request_success_total{{{pre},finished_reason="{reason}",{post}}} {_num(n)}')
        lines += ["# HELP vllm:request_success_created Count of successfully processed requests.",
                  "# TYPE vllm:request_success_created gauge"]
        for reason in self.success:
            lines.append(f'vllm:request_success_created{{{pre},finished_reason="{reason}",{post}}} {_num(self.created)}')
        out.append("\n".join(lines) + "\n")
        out.extend(h.text() for h in self.hist.values())
        out.append(self._static_cache_info)
        return "".join(out)

    def _render_sglang(self, running: int, waiting: int, used_tokens: int, total_tokens: int,
                       gen_throughput: float) -> str:
        lab = self._sg_labels
        hit_rate = self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
        out = [
            self._gauge("sglang:num_running_reqs", "The number of running requests.", running, lab),
            self._gauge("sglang:num_used_tokens", "The number of used tokens.", used_tokens, lab),
            self._gauge("sglang:token_usage", "The token usage.", used_tokens / max(total_tokens, 1), lab),
            self._gauge("sglang:gen_throughput", "The generation throughput (token/s).", gen_throughput, lab),
            self._gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", waiting, lab),
            self._gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", hit_rate, lab),
        ]
        for name, help_, value in (
            ("sglang:prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens),
            ("sglang:generation_tokens_total", "Number of generation tokens processed.", self.generation_tokens),
            ("sglang:cached_tokens_total", "Number of cached prompt tokens.", self.prompt_cached),
            ("sglang:num_requests_total", "Number of requests processed.", self.num_requests),
        ):
            out.append(f"# HELP {name} {help_}\n# TYPE {name} counter\n{name}{{{lab}}} {_num(value)}\n")
        out.extend(h.text() for h in self.hist.values())
        return "".join(out)
