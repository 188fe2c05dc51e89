"""The ``store`` URL: ``memory``, or Redis over TCP (``redis://``), TLS (``rediss://``) or a
unix socket (``unix://``). One parser for ``check-config`` and for the client
(``extproc.state.resp``), so a URL that passes the check is one the server can use.

    redis://[[user]:password@]host[:port][/db]
    rediss://[[user]:password@]host[:port][/db][?ssl_ca_certs=FILE&ssl_cert_reqs=required|optional|none
                                               &ssl_certfile=FILE&ssl_keyfile=FILE]
    unix://[[user]:password@]/path/to/redis.sock[?db=N]

Problems are phrased without the URL's password (``redact``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

SCHEMES = ("redis", "rediss", "unix")
_TLS_PARAMS = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = ("required", "optional", "none")


@dataclass(frozen=True)
class RedisURL:
    scheme: str
    host: str = ""           # redis://, rediss://
    port: int = 6379
    path: str = ""           # unix://: the socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"


def redact(url: str) -> str:
    """The URL with its password (in the user info or a ``password=`` parameter) replaced."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = p.netloc
    if "@" in netloc:
        user, _, hostport = netloc.rpartition("@")
        name, sep, pw = user.partition(":")
        netloc = f"{name}:***@{hostport}" if sep and pw else netloc
    query = "&".join(("password=***" if part.lower().startswith("password=") else part)
                     for part in p.query.split("&")) if p.query else ""
    return urlunsplit((p.scheme, netloc, p.path, query, p.fragment))


def parse_redis_url(url: str) -> RedisURL:
    """Parse and check a Redis URL; raises ValueError with a message safe to log."""
    shown = redact(url)
    try:
        p = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"cannot parse {shown!r}: {e}") from None
    if p.scheme not in SCHEMES:
        raise ValueError(f"unsupported scheme in {shown!r}; allowed: redis://, rediss:// (TLS), unix://")
    params = dict(parse_qsl(p.query, keep_blank_values=True))
    user = unquote(p.username) if p.username else None
    password = unquote(p.password) if p.password else None
    if p.scheme == "unix":
        allowed = {"db", "password"}
        path = unquote(p.path)
        if not path:
            raise ValueError(f"{shown!r}: no socket path (expected unix:///path/to/redis.sock)")
        if "password" in params:
            password = params["password"]
        db_text = params.get("db", "0")
        host, port = "", 0
    else:
        allowed = set(_TLS_PARAMS) if p.scheme == "rediss" else set()
        host = p.hostname or ""
        if not host:
            raise ValueError(f"{shown!r}: no host (expected {p.scheme}://host[:port][/db])")
        try:
            port = p.port or 6379
        except ValueError:
            raise ValueError(f"{shown!r}: the port is not a number 1..65535") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"{shown!r}: the port is not a number 1..65535")
        path = ""
        db_text = p.path.strip("/") or "0"
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"{shown!r}: unknown parameter(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(allowed)) or '(none)'}")
    if not db_text.isdigit():
        raise ValueError(f"{shown!r}: the database must be a number >= 0, got {db_text!r}")
    reqs = params.get("ssl_cert_reqs", "required")
    if reqs not in _CERT_REQS:
        raise ValueError(f"{shown!r}: ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
    for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        f = params.get(k)
        if f is not None and not os.path.isfile(f):
            raise ValueError(f"{shown!r}: {k}: no such file {f!r}")
    return RedisURL(p.scheme, host, port, path, int(db_text), user, password, params.get("ssl_ca_certs"), reqs,
                    params.get("ssl_certfile"), params.get("ssl_keyfile"))
