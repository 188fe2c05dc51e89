"""``python -m vllmsim`` (and the gateway's ``ai-lb sim``): argparse front end.

The only protocol with a parent process is stdout: one line per server when it listens,
one for the admin port, then ``vllmsim: ready``.  Nothing else is printed to stdout, so
a parent can read lines until ``ready`` and then ignore the pipe; logs go to stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any, Sequence

import yaml

from .cluster import SimCluster
from .faults import Faults
from .kv_events import KVEventsConfig
from .pd import DEFAULT_ABORT_TIMEOUT_S, KVTransferConfig
from .profile import bundled_profiles, load_profile, PROFILE_DIR
from .server import ServerConfig

DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ports(value: str) -> list[int]:
    try:
        return [int(p) for p in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port list {value!r}") from None


def _json_arg(cls: Any) -> Any:
    def parse(value: str) -> Any:
        try:
            return cls.from_json(value)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = cls.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=sys.argv[0] if sys.argv[0].startswith("ai-lb ") else "vllmsim",
                                description="vLLM-faithful server simulator")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start N simulated servers")
    g = s.add_argument_group("placement")
    g.add_argument("--num-servers", "-n", type=int, default=1)
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000,
                   help="first port; servers use port..port+N-1 (0: ephemeral ports)")
    g.add_argument("--ports", type=_ports, default=None,
                   help="explicit comma-separated ports (overrides --port/--num-servers)")
    g.add_argument("--admin-port", type=int, default=0,
                   help="cluster admin port (0: ephemeral, -1: none)")
    g.add_argument("--names", type=_csv, default=None,
                   help="x-sim-server values per server (default: the port)")

    g = s.add_argument_group("model and engine")
    g.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    g.add_argument("--profile", default="h100-8b", help="bundled profile name or YAML path")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile key (value parsed as YAML); repeatable")
    g.add_argument("--num-gpu-blocks", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-loras", type=int)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--default-max-tokens", type=int)
    g.add_argument("--role", choices=("mixed", "prefill", "decode"), default="mixed",
                   help="prefill/decode: shortcut for a kv-transfer config with kv_role "
                        "kv_producer/kv_consumer")
    g.add_argument("--roles", type=_csv, default=None,
                   help="per-server roles, e.g. prefill,prefill,decode,decode")
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per simulated second (0.1 = 10x faster)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stream-chunk-tokens", type=int, default=1,
                   help="tokens per SSE chunk (>1 saves simulator CPU)")

    g = s.add_argument_group("vLLM KV connectors and events")
    g.add_argument("--kv-events-config", type=_json_arg(KVEventsConfig), default=None,
                   help="vLLM's KVEventsConfig as JSON, e.g. '{\"enable_kv_cache_events\": true, "
                        "\"publisher\": \"zmq\", \"endpoint\": \"tcp://127.0.0.1:5557\"}'; server i "
                        "adds i to the endpoint ports; {index} {port} {host} {model} in topic")
    g.add_argument("--kv-transfer-config", type=_json_arg(KVTransferConfig), default=None,
                   help="vLLM's KVTransferConfig as JSON, e.g. '{\"kv_connector\": \"NixlConnector\", "
                        "\"kv_role\": \"kv_both\"}': honour kv_transfer_params (PD disaggregation)")
    g.add_argument("--kv-abort-timeout", type=float, default=DEFAULT_ABORT_TIMEOUT_S,
                   help="simulated seconds a prefill server holds blocks for a decode server "
                        "(vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT, default 480)")
    g.add_argument("--no-sim-api", action="store_true",
                   help="look like a plain vLLM: no /sim/* routes, no x-sim-* headers, no admin port")

    g = s.add_argument_group("metrics")
    g.add_argument("--metrics-flavor", choices=("vllm", "sglang"), default="vllm")
    g.add_argument("--legacy-gpu-cache-metric", action="store_true",
                   help="also emit vllm:gpu_cache_usage_perc")
    g.add_argument("--lora-adapters", type=_csv, default=[],
                   help="LoRA adapter names (requests select one as their model)")

    g = s.add_argument_group("faults (start-up values; see /sim/faults)")
    g.add_argument("--slowdown", type=float, default=1.0)
    g.add_argument("--error-rate", type=float, default=0.0)
    g.add_argument("--error-status", type=int, default=500)
    g.add_argument("--hang", action="store_true")
    g.add_argument("--restart-after-s", type=float, default=None,
                   help="auto-restart this long after a crash")

    g = s.add_argument_group("process")
    g.add_argument("--duration", type=float, default=None, help="exit after this many seconds")
    g.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    g.add_argument("--exit-with-parent", action="store_true",
                   help="exit when the parent process dies (used by vllmsim.testing)")
    g.add_argument("--log-level", default="WARNING")

    sub.add_parser("profiles", help="list bundled profiles")
    sh = sub.add_parser("show-profile", help="print a profile with overrides applied")
    sh.add_argument("profile", nargs="?", default="h100-8b")
    sh.add_argument("--set", dest="overrides", action="append", default=[])
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    flags = {"num_gpu_blocks": "num_gpu_blocks", "block_size": "block_size",
             "max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
             "max_model_len": "max_model_len", "max_loras": "max_loras",
             "default_max_tokens": "default_max_tokens"}
    for attr, key in flags.items():
        v = getattr(args, attr, None)
        if v is not None:
            out[key] = v
    if getattr(args, "no_prefix_caching", False):
        out["enable_prefix_caching"] = False
    return out


def cluster_from_args(args: argparse.Namespace) -> SimCluster:
    """Build (not start) the cluster an argv describes."""
    profile = load_profile(args.profile, _overrides(args))
    faults = Faults()
    faults.update({"slowdown": args.slowdown, "error_rate": args.error_rate,
                   "error_status": args.error_status, "hang": args.hang})
    n = len(args.ports) if args.ports else args.num_servers
    if n < 1:
        raise ValueError("need at least one server")
    roles = args.roles or [args.role] * n
    if len(roles) != n:
        raise ValueError(f"--roles lists {len(roles)} roles for {n} servers")
    configs = []
    for i in range(n):
        configs.append(ServerConfig(
            model=args.model, profile=profile, role=roles[i], time_scale=args.time_scale,
            seed=args.seed, name=args.names[i] if args.names and i < len(args.names) else None,
            metrics_flavor=args.metrics_flavor, legacy_gpu_cache_metric=args.legacy_gpu_cache_metric,
            lora_adapters=tuple(args.lora_adapters), stream_chunk_tokens=args.stream_chunk_tokens,
            faults=Faults(**faults.to_dict()), restart_after_s=args.restart_after_s,
            kv_events=args.kv_events_config, kv_transfer=args.kv_transfer_config,
            kv_abort_timeout_s=args.kv_abort_timeout, sim_api=not args.no_sim_api))
    admin = None if args.admin_port < 0 or args.no_sim_api else args.admin_port
    if args.ports:
        return SimCluster(configs=configs, host=args.host, ports=args.ports, admin_port=admin)
    return SimCluster(configs=configs, host=args.host, base_port=args.port, admin_port=admin)


async def _watch_parent(stop: asyncio.Event) -> None:
    """A test runner killed with SIGKILL cannot stop us: notice re-parenting instead."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            stop.set()


async def _serve(cluster: SimCluster, duration: float | None, exit_with_parent: bool = False
                 ) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    watcher = loop.create_task(_watch_parent(stop)) if exit_with_parent else None
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await cluster.start()
    try:
        for s in cluster.servers:
            extra = f", kv_role={s.kv_transfer.kv_role}, side_channel_port={s.side_channel_port}" \
                if s.kv_transfer else ""
            print(f"vllmsim: server {s.index} listening on {s.host}:{s.port} "
                  f"(role={s.config.role}, name={s.name}{extra})", flush=True)
        if cluster.admin_port is not None:
            print(f"vllmsim: admin listening on {cluster.host}:{cluster.admin_port}", flush=True)
        print("vllmsim: ready", flush=True)
        if duration is not None:
            try:
                await asyncio.wait_for(stop.wait(), duration)
            except asyncio.TimeoutError:
                pass
        else:
            await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await cluster.stop()


def _run(coro: Any, use_uvloop: bool) -> None:
    if use_uvloop:
        try:
            import uvloop  # optional: about 2x cheaper streaming
        except ImportError:
            use_uvloop = False
    if use_uvloop:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns a process exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command == "profiles":
        for name in bundled_profiles():
            print(f"{name}\t{PROFILE_DIR / (name + '.yaml')}")
        return 0
    if args.command == "show-profile":
        try:
            prof = load_profile(args.profile, _overrides(args))
        except (ValueError, FileNotFoundError) as e:
            print(f"vllmsim: {e}", file=sys.stderr)
            return 2
        import dataclasses
        print(yaml.safe_dump(dataclasses.asdict(prof), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cluster = cluster_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vllmsim: {e}", file=sys.stderr)
        return 2
    try:
        _run(_serve(cluster, args.duration, args.exit_with_parent), not args.no_uvloop)
    except OSError as e:
        print(f"vllmsim: cannot listen: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
