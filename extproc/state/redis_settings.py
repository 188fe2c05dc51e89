"""Redis settings in a policy's ``lb_config``, declared once for every policy that uses Redis.

The field names are Higress's (``serviceFQDN``, ``servicePort``, ``username``,
``password``, ``timeout``, ``database``), so a Higress ``lb_config`` moves over unchanged.
Without ``serviceFQDN`` the config's global ``store`` is used (``memory`` or a redis URL).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote


def higress_redis_url(serviceFQDN: str, servicePort: int, username: str = "", password: str = "",
                      database: int = 0) -> str:
    """Higress's lb_config Redis fields as a redis:// URL."""
    auth = ""
    if username or password:
        auth = f"{quote(username, safe='')}:{quote(password, safe='')}@"
    return f"redis://{auth}{serviceFQDN}:{servicePort}/{database}"


@dataclass(frozen=True)
class RedisSettings:
    serviceFQDN: str | None = None
    servicePort: int = 6379
    username: str = ""
    password: str = ""
    timeout: float = 50.0      # ms per Redis call; Higress: 3000 (a 3 s stall on the request path)
    database: int = 0

    def store_url(self, default: str) -> str:
        """This policy's store: its own Redis when ``serviceFQDN`` is set, else ``default``."""
        if not self.serviceFQDN:
            return default
        return higress_redis_url(self.serviceFQDN, self.servicePort, self.username, self.password, self.database)

    @property
    def timeout_s(self) -> float:
        return self.timeout / 1000.0

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.serviceFQDN is not None and not self.serviceFQDN:
            out.append(("serviceFQDN", "must not be empty"))
        if not 1 <= self.servicePort <= 65535:
            out.append(("servicePort", "expected a port 1..65535"))
        if self.timeout <= 0:
            out.append(("timeout", "must be > 0 (milliseconds)"))
        if self.database < 0:
            out.append(("database", "must be >= 0"))
        return out
