"""``ai-lb`` command line: ``serve`` and ``check-config``, plus the commands registered
under the ``ai_lb.commands`` entry-point group: ``pd-sidecar`` (product code, a process of
its own in front of each decode server) and ``demo``, ``bench``, ``sim`` (the dev tooling
and the simulator, which sit above the product and are never imported by it)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib import metadata

from . import __version__
from .config import ConfigError
from .runtime import load_config

COMMAND_GROUP = "ai_lb.commands"


def _commands() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=COMMAND_GROUP)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = _commands()
    if argv and argv[0] in extra and argv[0] not in ("serve", "check-config"):
        try:
            run = extra[argv[0]].load()
        except ImportError as e:  # an optional extra is missing
            print(f"ai-lb {argv[0]}: cannot load ({e}); install the package's extras, e.g. "
                  f"pip install 'ai-lb[bench]'", file=sys.stderr)
            return 2
        # argparse names a program after sys.argv[0]: "ai-lb sim", not "vllmsim", in its usage.
        sys.argv[0] = f"ai-lb {argv[0]}"
        return run(argv[1:])
    p = argparse.ArgumentParser(prog="ai-lb", description="LLM-aware load balancing for Envoy (ext_proc).")
    p.add_argument("--version", action="version", version=f"ai-lb {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    s = sub.add_parser("serve", help="run the ext_proc server")
    s.add_argument("-c", "--config", required=True, help="YAML config file (reloaded on change and SIGHUP)")
    c = sub.add_parser("check-config", help="validate a config file: exit 0, or 2 with one line per problem")
    c.add_argument("file")
    for name in sorted(extra):
        sub.add_parser(name, help=f"see `ai-lb {name} --help`", add_help=False)
    a = p.parse_args(argv)
    if a.cmd is None:
        p.print_help()
        return 2
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
        setup_logging(cfg.log_level, cfg.log_format)
        if cfg.server.workers > 1:  # several processes on one port, a supervisor over them
            from .supervisor import run as run_workers

            run_workers(a.config, cfg)
            return 0
        from .server import run

        run(a.config, cfg)
        return 0
    return 1


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """``log_format: json`` for log pipelines; the text format for people."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


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
