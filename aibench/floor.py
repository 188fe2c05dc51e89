"""The ext_proc floor: Envoy calling an ext_proc server that does no work.

``native/extproc_floor.c`` is the cheapest ext_proc server we can build (C, nghttp2, one
thread): it answers every request with a prebuilt answer that routes it to the next
backend (round robin), tagged like ai-lb's so that Envoy's access log streams an entry
back, exactly as with ai-lb. Put in front of the same Envoy config as ai-lb, it measures
what the ext_proc round trip costs by itself: Envoy's side of it (the gRPC call, the
header and attribute serialisation, override_host, the access log) and one loopback hop.
A target that this floor misses cannot be met by any ext_proc server on that machine;
the gap between the floor and ai-lb is ai-lb's own cost.

It is a measuring instrument of the bench, never part of the product. It needs a C
compiler and nghttp2's headers (Debian: ``apt-get install gcc libnghttp2-dev``) and is
built once per source version into a cache directory.

    python -m aibench.floor        # build it and print where it is (or why it cannot be)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from . import devstack as ds

SOURCE = Path(__file__).with_name("native") / "extproc_floor.c"


class FloorUnavailable(RuntimeError):
    """The floor cannot be built here (no compiler, no nghttp2 headers)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ai-lb-bench"


def build(cache: Path | None = None) -> Path:
    """The compiled floor server (built on first use, per source version)."""
    src = SOURCE.read_bytes()
    out = (cache or cache_dir()) / f"extproc_floor-{hashlib.sha256(src).hexdigest()[:12]}"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise FloorUnavailable("no C compiler (apt-get install gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    r = subprocess.run([cc, "-O2", "-o", str(tmp), str(SOURCE), "-lnghttp2"], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        hint = " (apt-get install libnghttp2-dev)" if "nghttp2" in r.stderr else ""
        raise FloorUnavailable(f"cannot build {SOURCE.name}{hint}: {r.stderr.strip()[-300:]}")
    tmp.replace(out)
    return out


def write_answers(path: Path, backends: list[str]) -> Path:
    """One prebuilt answer per backend (ai-lb's own answer bytes: destination header and
    metadata, and an ``ai_lb`` id so that Envoy logs the request), as gRPC messages (the
    floor sends them as they are), each behind its 4-byte length."""
    from extproc.envoy.access_log import tag
    from extproc.envoy.answers import Answers
    from extproc.transport.grpc import encode_message

    answers = Answers()
    with open(path, "wb") as f:
        for i, b in enumerate(backends):
            msg = encode_message(tag(answers.serialized(answers.pick("headers", b)), f"floor.0.0.{i:x}"))
            f.write(struct.pack(">I", len(msg)) + msg)
    return path


def start(tmp: Path, port: int, backends: list[str], cache: Path | None = None) -> ds.Proc:
    """Serve ext_proc on 127.0.0.1:``port``, routing round robin over ``backends``."""
    exe = build(cache)
    answers = write_answers(tmp / "floor-answers.bin", backends)
    p = ds.spawn("ext_proc-floor", [str(exe), str(port), str(answers)], tmp)
    ds.wait_port(port, proc=p)
    return p


def main() -> int:
    try:
        exe = build()
    except FloorUnavailable as e:
        print(f"ext_proc floor unavailable: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        port = ds.free_ports(1)[0]
        p = start(Path(d), port, ["127.0.0.1:9"])
        p.stop()
    print(exe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
