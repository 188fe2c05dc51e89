#!/usr/bin/env bash
# Set up, then run every test: unit tests, the simulator's tests and the end-to-end tests
# through a real Envoy binary. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
