#!/usr/bin/env bash
# The main job: set up, then run Envoy + ai-lb + three simulated vLLM servers on loopback,
# send traffic and show where each request went. Extra arguments go to `ai-lb demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ai-lb demo "$@"
