"""``ai-lb pd-sidecar``: run the PD sidecar in front of a decode server (one per decode
server; several ``--listen``/``--decode`` pairs run several in one process)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ..config.sources import valid_hostport
from .proxy import Sidecar, SidecarConfig, parse_allow


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ai-lb pd-sidecar", description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                   help="where Envoy sends this decode server's requests (register this address with ai-lb); "
                        "loopback unless you give another (default 127.0.0.1:8000)")
    p.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="the local decode server, e.g. http://127.0.0.1:8200 (one per --listen)")
    p.add_argument("--prefill-timeout", type=float, default=60.0, help="seconds for a prefill request")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to a server")
    p.add_argument("--prefill-allow", action="append", default=[], metavar="CIDR|IP|IP:PORT",
                   help="prefill servers this sidecar may call (repeat; default: any literal address ai-lb names)")
    p.add_argument("--max-body-bytes", type=int, default=32 << 20, help="largest request body accepted")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def configs(a: argparse.Namespace) -> list[SidecarConfig]:
    listens = a.listen or ["127.0.0.1:8000"]
    if len(a.decode) != len(listens):
        raise ValueError(f"give one --decode per --listen ({len(listens)} listen, {len(a.decode)} decode)")
    for x in listens:
        if not valid_hostport(x, allow_port_zero=True):
            raise ValueError(f"--listen {x!r}: expected host:port")
    allow = parse_allow(a.prefill_allow)
    if a.prefill_timeout <= 0 or a.connect_timeout <= 0 or a.max_body_bytes <= 0:
        raise ValueError("timeouts and --max-body-bytes must be > 0")
    return [SidecarConfig(listen=x, decode=d, prefill_timeout=a.prefill_timeout, connect_timeout=a.connect_timeout,
                          allow=allow, max_body_bytes=a.max_body_bytes) for x, d in zip(listens, a.decode)]


async def serve(cfgs: list[SidecarConfig]) -> None:
    cars = [Sidecar(c) for c in cfgs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for car in cars:
            await car.start()
        if not cfgs[0].allow:
            logging.getLogger("ai_lb.pd_sidecar").warning(
                "no --prefill-allow: the sidecar calls any address in x-prefiller-host-port; make sure only "
                "Envoy (which strips clients' copies of that header) can reach it")
        await stop.wait()
    finally:
        for car in cars:
            await car.stop()


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        cfgs = configs(a)
    except ValueError as e:
        print(f"ai-lb pd-sidecar: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(cfgs))
    except OSError as e:
        print(f"ai-lb pd-sidecar: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
