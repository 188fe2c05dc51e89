"""Generate the docker-compose Envoy config from the reference one, so they cannot drift.

    python -m aibench.compose          # rewrite extproc/envoy/reference/envoy-compose.yaml
    python -m aibench.compose --check  # exit 1 if the committed file is not what this generates

The compose variant is the reference ``envoy.yaml`` with only addresses changed: Envoy
listens on all interfaces of its container (compose decides what is published), and the
clusters resolve the compose services by name (STRICT_DNS, so each of vllm-sim's ports
stays a separate host that ai-lb can name and override_host can match). Each rewrite must
match exactly as often as expected: a change to the reference that a rewrite no longer
fits fails here, instead of silently drifting.
"""

from __future__ import annotations

import argparse
import re
import sys

from extproc.envoy import reference_config

HEADER = """\
# GENERATED from envoy.yaml (same folder) by `python -m aibench.compose`: do not edit; edit
# envoy.yaml and run it again (tests/e2e/test_demo.py checks that the two agree).
# Envoy config for docker-compose.yaml: the reference config with only addresses changed:
#   * listener and admin bind 0.0.0.0 inside the container (compose publishes them on
#     127.0.0.1 only),
#   * llm_backends is STRICT_DNS on the vllm-sim service's ports 8001..8003,
#     llm_backends_b / llm_backends_c on its ports 8004 / 8005 (route /multi/),
#   * ai_lb is STRICT_DNS on the ai-lb service.
# STRICT_DNS (not LOGICAL_DNS) because llm_backends has several endpoints and each must stay a
# separate host: Envoy's admin API lists them as <container-ip>:<port>, ai-lb discovers them
# there and names one in x-gateway-destination-endpoint, and override_host matches it.
# The reference config's own notes follow.
#
"""

# (pattern, replacement, how many times it must match)
REWRITES: list[tuple[str, str, int]] = [
    (r"\[ext_proc: ai-lb @ 127\.0\.0\.1:50051\]", "[ext_proc: ai-lb @ ai-lb:50051]", 1),
    (r"\{address: 127\.0\.0\.1, port_value: (9901|10000)\}", r"{address: 0.0.0.0, port_value: \1}", 2),
    (r"\{address: 127\.0\.0\.1, port_value: (800[1-5])\}", r"{address: vllm-sim, port_value: \1}", 5),
    (r"\{address: 127\.0\.0\.1, port_value: 50051\}", "{address: ai-lb, port_value: 50051}", 1),
    (r"(?m)^    type: STATIC\n", "    type: STRICT_DNS\n    dns_lookup_family: V4_ONLY\n", 4),
]


def render(reference: str) -> str:
    out = reference
    for pattern, repl, expected in REWRITES:
        out, n = re.subn(pattern, repl, out)
        if n != expected:
            raise ValueError(f"envoy.yaml changed: {pattern!r} matched {n} time(s), expected {expected}; "
                             "update aibench/compose.py")
    if "127.0.0.1" in out:
        line = next(i + 1 for i, s in enumerate(out.splitlines()) if "127.0.0.1" in s)
        raise ValueError(f"a loopback address is left in the compose config (line {line}); update aibench/compose.py")
    return HEADER + out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aibench.compose", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the committed file is up to date")
    a = p.parse_args(argv)
    want = render(reference_config("envoy.yaml").read_text())
    target = reference_config("envoy-compose.yaml")
    if a.check:
        if target.read_text() != want:
            print(f"{target} is out of date: run python -m aibench.compose", file=sys.stderr)
            return 1
        print(f"{target}: up to date")
        return 0
    target.write_text(want)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
