"""``ai-lb`` command line: serve, check-config, demo, sim."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sim":  # the simulator has its own CLI; pass everything through
        from vllmsim.cli import main as sim_main

        return sim_main(argv[1:])
    if argv and argv[0] == "bench":  # the benchmark harness, likewise
        from aibench.cli import main as bench_main

        return bench_main(argv[1:])
    p = argparse.ArgumentParser(prog="ai-lb", description="LLM-aware load balancing for Envoy (ext_proc).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the ext_proc server")
    s.add_argument("-c", "--config", required=True, help="YAML config file (reloaded on change and SIGHUP)")
    c = sub.add_parser("check-config", help="validate a config file: exit 0, or 2 with one line per problem")
    c.add_argument("file")
    d = sub.add_parser("demo", help="start simulated vLLM servers, ai-lb and Envoy, send traffic, show where it went")
    d.add_argument("--requests", type=int, default=24)
    d.add_argument("--policy", default="least_request")
    d.add_argument("--backends", type=int, default=3, help="number of simulated vLLM servers")
    d.add_argument("--time-scale", type=float, default=0.05, help="simulator wall seconds per simulated second")
    sub.add_parser("sim", help="run the vLLM simulator (see `ai-lb sim --help`)")
    sub.add_parser("bench", help="benchmark ai-lb against other routers (see `ai-lb bench --help`)")
    a = p.parse_args(argv)

    if a.cmd == "check-config":
        cfg = _load_or_report(a.file)
        if cfg is None:
            return 2
        print(f"{a.file}: OK ({len(cfg.routes)} route(s): "
              + ", ".join(f"{n}={r.lb_policy}" for n, r in cfg.routes.items()) + ")")
        return 0
    if a.cmd == "serve":
        cfg = _load_or_report(a.config)
        if cfg is None:
            return 2
        logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from .server import run

        run(a.config, cfg)
        return 0
    if a.cmd == "demo":
        from .demo import main as demo_main

        return demo_main(requests=a.requests, policy=a.policy, backends=a.backends, time_scale=a.time_scale)
    return 1


def _load_or_report(path: str):
    """The config, or None after printing one line per problem (file: field path: message)."""
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.problems:
            print(f"{path}: {line}", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
