"""``registration:``: the FastDeploy-compatible registration API (``POST /register``, ...),
its register.yaml, its health checks, and where the registry lives.

Field names are FastDeploy router's (``health-failure-threshold``, ``register-path``, ...;
dashes and underscores are the same field). Registering a backend is a control-plane
write: anyone who can register can take traffic. So the API binds to loopback by default,
takes a bearer token (``token_file`` or ``token_env``; the value is never logged), and a
non-loopback ``listen`` without a token is a config error.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from .sources import valid_hostport
from .store_url import parse_redis_url


@dataclass(frozen=True)
class RegistrationConfig:
    listen: str = "127.0.0.1:30000"           # the API (FastDeploy's router port is 30000 in its docs)
    token_file: str | None = None             # bearer token: the file's content (stripped) ...
    token_env: str | None = None              # ... or this environment variable's value
    register_path: str | None = None          # FastDeploy's register.yaml, loaded at start
    store: str | None = None                  # memory | redis://... (default: the config's store)
    key: str = "ai-lb:registry"               # the Redis hash holding the instances
    redis_timeout: float = 200.0              # ms per Redis call
    health_failure_threshold: int = 3         # failed checks before an instance leaves rotation
    health_success_threshold: int = 2         # passed checks before it returns (and before a registration is accepted)
    health_check_timeout_secs: float = 5.0
    health_check_interval_secs: float = 5.0
    health_check_endpoint: str = "/health"
    max_instances: int = 1024                 # registrations past this are refused (409)
    remove_unhealthy_after_secs: float = 0.0  # unregister after this long unhealthy (0: never)

    def validate(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if not valid_hostport(self.listen, allow_port_zero=True):
            out.append(("listen", f"expected host:port, got {self.listen!r}"))
        elif self.token_file is None and self.token_env is None and not is_loopback(self.listen):
            out.append(("listen", "a registration API off loopback needs a bearer token: set token_file or "
                                  "token_env (anyone who can register an instance can take traffic)"))
        if self.token_file is not None and self.token_env is not None:
            out.append(("token_file", "give token_file or token_env, not both"))
        for name, (ok, why) in (("token_file", self._token_file_ok()), ("token_env", self._token_env_ok())):
            if not ok:
                out.append((name, why))
        if self.store not in (None, "memory"):
            try:
                parse_redis_url(self.store)
            except ValueError as e:
                out.append(("store", f"expected 'memory' or a Redis URL: {e}"))
        for f in ("health_failure_threshold", "health_success_threshold", "max_instances"):
            if getattr(self, f) < 1:
                out.append((f, "must be >= 1"))
        for f in ("health_check_timeout_secs", "health_check_interval_secs", "redis_timeout"):
            if getattr(self, f) <= 0:
                out.append((f, "must be > 0"))
        if self.remove_unhealthy_after_secs < 0:
            out.append(("remove_unhealthy_after_secs", "must be >= 0 (0: never)"))
        if not self.health_check_endpoint.startswith("/"):
            out.append(("health_check_endpoint", "must start with /"))
        if not self.key:
            out.append(("key", "must not be empty"))
        return out

    def _token_file_ok(self) -> tuple[bool, str]:
        if self.token_file is None:
            return True, ""
        try:
            with open(self.token_file, encoding="utf-8") as f:
                ok = bool(f.read().strip())
        except (OSError, UnicodeDecodeError) as e:
            return False, f"cannot read the token file ({type(e).__name__})"
        return ok, "the token file is empty"

    def _token_env_ok(self) -> tuple[bool, str]:
        if self.token_env is None:
            return True, ""
        return bool(os.environ.get(self.token_env, "").strip()), "the environment variable is unset or empty"

    def token(self) -> str | None:
        """The bearer token (None: none configured, loopback only)."""
        if self.token_file is not None:
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip() or None
        if self.token_env is not None:
            return os.environ.get(self.token_env, "").strip() or None
        return None


def is_loopback(hostport: str) -> bool:
    host = hostport.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_registration(v: Any, raw: Any, routes_registered: list[str]) -> RegistrationConfig | None:
    """The ``registration`` block (None when absent); routes reading the registry need it."""
    if raw is None:
        for r in routes_registered:
            v.err(f"routes.{r}.endpoints.registered", "needs the top-level 'registration' block (the registry "
                                                      "and its health checks)")
        return None
    reg, bad = v.dataclass_partial("registration", raw, RegistrationConfig)
    v.validate_partial("registration", reg, bad)
    return reg if not bad else None
