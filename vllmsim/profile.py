"""Latency/capacity profiles: the numbers that make one simulated server behave like a GPU.

Profiles live in YAML so that a benchmark can be re-run against a different GPU/model
without touching code; overrides let a test shrink the KV cache or speed up steps
without a file of its own.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "h100-8b"


@dataclass(frozen=True)
class OutputLen:
    """How many tokens a request generates when it is not simply max_tokens.

    Real traffic mostly stops on EOS well before max_tokens; a distribution lets a
    benchmark reproduce that spread while staying deterministic through the seed.
    """

    distribution: str = "fixed"  # fixed | uniform | lognormal
    min: int = 1
    max: int = 1024
    mean: float = 256.0
    sigma: float = 0.8

    def sample(self, rng: random.Random, max_tokens: int) -> int:
        """Return the number of tokens to generate (1..max_tokens)."""
        if self.distribution == "fixed":
            return max_tokens
        if self.distribution == "uniform":
            n = rng.randint(self.min, self.max)
        elif self.distribution == "lognormal":
            # mean is the distribution's mean, not the underlying normal's mu.
            mu = math.log(max(self.mean, 1.0)) - self.sigma**2 / 2
            n = int(round(rng.lognormvariate(mu, self.sigma)))
        else:
            raise ValueError(f"unknown output_len distribution {self.distribution!r}")
        return max(1, min(n, max_tokens))


@dataclass(frozen=True)
class Profile:
    """Everything the engine needs to know about the simulated GPU + model."""

    name: str = "custom"
    block_size: int = 16
    num_gpu_blocks: int = 28672
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    max_model_len: int = 8192
    max_loras: int = 1
    base_ms: float = 6.5
    per_prefill_token_ms: float = 0.06
    per_decode_seq_ms: float = 0.045
    per_context_token_ms: float = 0.00004
    kv_transfer_per_token_ms: float = 0.005  # KV read from a prefill server, per token
    default_max_tokens: int = 16
    output_len: OutputLen = field(default_factory=OutputLen)

    def step_ms(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        """Simulated duration of one engine step (one forward pass)."""
        return (
            self.base_ms
            + prefill_tokens * self.per_prefill_token_ms
            + decode_seqs * self.per_decode_seq_ms
            + context_tokens * self.per_context_token_ms
        )

    @property
    def effective_max_model_len(self) -> int:
        """A request longer than the whole KV cache could never be scheduled, so cap it."""
        return min(self.max_model_len, self.num_gpu_blocks * self.block_size)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "Profile":
        """Return a copy with some keys replaced (unknown keys are an error, not ignored)."""
        if not overrides:
            return self
        return _from_mapping({**_to_mapping(self), **dict(overrides)})


def _to_mapping(p: Profile) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    return d


def _coerce(name: str, value: Any, typ: Any) -> Any:
    if typ in (int, "int"):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"profile key {name!r} must be an integer")
        return int(value)
    if typ in (float, "float"):
        if isinstance(value, bool):
            raise ValueError(f"profile key {name!r} must be a number")
        return float(value)
    if typ in (bool, "bool"):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    return value


def _from_mapping(data: Mapping[str, Any]) -> Profile:
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown profile keys: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "output_len":
            if isinstance(value, OutputLen):
                kwargs[key] = value
            else:
                ol = dict(value or {})
                ofields = {f.name for f in dataclasses.fields(OutputLen)}
                bad = set(ol) - ofields
                if bad:
                    raise ValueError(f"unknown output_len keys: {sorted(bad)}")
                kwargs[key] = OutputLen(**ol)
            continue
        kwargs[key] = _coerce(key, value, fields[key].type)
    prof = Profile(**kwargs)
    _validate(prof)
    return prof


def _validate(p: Profile) -> None:
    for key in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens",
                "max_model_len", "default_max_tokens", "max_loras"):
        if getattr(p, key) < 1:
            raise ValueError(f"profile key {key!r} must be >= 1")
    if p.output_len.distribution not in ("fixed", "uniform", "lognormal"):
        raise ValueError(f"unknown output_len distribution {p.output_len.distribution!r}")


def load_profile(name_or_path: str | Path | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Profile:
    """Load a bundled profile by name (``h100-8b``) or a YAML file by path."""
    ref = str(name_or_path or DEFAULT_PROFILE)
    path = Path(ref)
    if not path.suffix:
        path = PROFILE_DIR / f"{ref}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"profile {ref!r} not found (bundled: {available})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"profile {path} must be a YAML mapping")
    data.setdefault("name", path.stem)
    return _from_mapping(data).with_overrides(overrides)


def bundled_profiles() -> list[str]:
    """Names accepted by ``load_profile`` without a path."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
