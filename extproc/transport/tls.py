"""TLS and mTLS for the ext_proc listener, from certificate files, reloaded when they change.

``TlsFiles`` names the server certificate chain and key and, for mTLS, the CA bundle that
client certificates must chain to. ``ReloadingTls`` owns the contexts:

* the listener keeps one ``SSLContext`` for its whole life; its SNI callback (which
  OpenSSL calls on every ClientHello, with or without a server name) hands each new
  handshake the newest context, so a reload never touches a connection already open;
* a reload builds a complete new context first and swaps it in only if the files load
  (a half-written file or a key that does not match its certificate keeps the old one,
  logged), so a rotation in progress never breaks handshakes;
* files are polled (mtime, size, inode): this works on every filesystem, and with
  Kubernetes secret volumes, which swap a symlink.

``grpcio_credentials`` gives grpcio's server the same behaviour through its dynamic
credentials (the fetcher runs per handshake, at most once per poll interval).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ai_lb.tls")

ALPN = ["h2"]


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None  # set: clients must present a certificate signed by it (mTLS)

    def paths(self) -> tuple[str, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


def build_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context for HTTP/2 over TLS 1.2+; raises ``OSError``/``ssl.SSLError``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    ctx.set_alpn_protocols(ALPN)
    # RFC 9113 9.2: no renegotiation, no compression; TLS 1.2 needs an AEAD ECDHE suite.
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    if files.client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=files.client_ca)
    return ctx


def _signature(paths: tuple[str, ...]) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)  # follows symlinks: a secret volume's swap shows up here
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class ReloadingTls:
    """The listener's TLS context and its reloads. Raises at construction if the files do
    not load: a server must not start without its certificate."""

    def __init__(self, files: TlsFiles, poll_interval: float = 1.0) -> None:
        self.files = files
        self.poll_interval = poll_interval
        self.current = build_context(files)
        self._sig = _signature(files.paths())
        self.reloads = 0   # successful reloads
        self.failures = 0  # reloads rejected (old context kept)
        self.listener = build_context(files)
        self.listener.sni_callback = self._pick_context
        self._task: asyncio.Task | None = None

    def _pick_context(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self.current is not ctx:
            sslobj.context = self.current
        return None

    def check(self) -> bool:
        """Reload if a file changed; True when a new context was installed."""
        sig = _signature(self.files.paths())
        if sig == self._sig:
            return False
        try:
            new = build_context(self.files)
        except (OSError, ssl.SSLError, ValueError) as e:
            self.failures += 1
            log.error("TLS files changed but do not load (keeping the previous certificate): %s", e)
            self._sig = sig  # retried when they change again
            return False
        self.current, self._sig = new, sig
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.check()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="tls-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def grpcio_credentials(files: TlsFiles, poll_interval: float = 1.0) -> Any:
    """grpcio server credentials that pick up changed files for new handshakes."""
    import grpc

    def config() -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(_read(files.key), _read(files.cert))],
            root_certificates=_read(files.client_ca) if files.client_ca else None)

    state = {"sig": _signature(files.paths()), "at": time.monotonic()}

    def fetch() -> Any:
        now = time.monotonic()
        if now - state["at"] < poll_interval:
            return None
        state["at"] = now
        sig = _signature(files.paths())
        if sig == state["sig"]:
            return None
        state["sig"] = sig
        try:
            cfg = config()
        except OSError as e:
            log.error("TLS files changed but cannot be read (keeping the previous certificate): %s", e)
            return None
        log.info("TLS certificate reloaded from %s (grpcio)", files.cert)
        return cfg

    return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=bool(files.client_ca))
