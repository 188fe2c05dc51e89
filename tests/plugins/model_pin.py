"""A test plugin policy that reads the JSON body: pins each ``model`` to one endpoint.

It exists to exercise the body path end to end (buffering, parsing, malformed bodies,
bodyless requests) and the plugin mechanism, independently of the shipped policies.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from extproc import Policy, PolicyConfig, register_policy


@dataclass(frozen=True)
class ModelPinConfig(PolicyConfig):
    salt: str = ""


@register_policy
class ModelPin(Policy):
    name = "test_model_pin"
    Config = ModelPinConfig
    needs_body = True

    async def pick(self, ctx, candidates):
        model = ctx.model or ""
        eps = sorted(candidates, key=lambda e: e.address)
        return eps[zlib.crc32((self.config.salt + model).encode()) % len(eps)]
