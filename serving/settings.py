"""Service settings: the environment variables the app reads (and `longer serve` flags set).

Every setting is `LONGER_<NAME>` (pydantic-settings, `env_prefix="LONGER_"`), except the Redis
URL, which is `REDIS_URL` as everywhere else in the project; `ENV` lists them all. The bundle
directory is `LONGER_BUNDLE`, or `LONGER_MODEL` (its older name, still read). A value that does
not parse is a `SettingsError` naming the variable, the value and what was expected.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from longer.errors import UsageError
from trainer.threads import AUTO


class SettingsError(UsageError):
    """An environment variable (or flag) with a value the service cannot use."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LONGER_", frozen=True, populate_by_name=True, extra="forbid"
    )

    model: str = Field("", validation_alias=AliasChoices("LONGER_BUNDLE", "LONGER_MODEL"))  # bundle directory
    redis_url: str = Field("", validation_alias=AliasChoices("REDIS_URL"))  # empty: embedded
    token: str = ""  # empty: write endpoints open
    max_candidates: int = Field(1000, ge=1)
    max_events: int = Field(1000, ge=1)
    max_body_bytes: int = Field(4 << 20, ge=1)  # a larger body (any transfer encoding) gets 413
    body_timeout_s: float = Field(10.0, gt=0)  # a body not complete this long after the request arrived: 408
    threads: int = Field(0, ge=0)  # torch intra-op threads for model compute (0 or "auto": the CPU budget)
    # torch threads one model call uses at most (serving/runtime.py ComputeSlots; 0: no cap)
    call_threads: int = Field(1, ge=0)
    # model calls at once (serving/runtime.py ComputeSlots; 0: the thread budget + 1)
    compute_slots: int = Field(0, ge=0)
    # freeze the loaded heap out of full garbage collections at start and reload (serving/heap.py)
    freeze_heap: bool = True
    # a /v1/score request alone in the server reads and scores on the event loop thread, with
    # no hop to the pool (serving/hops.py)
    idle_inline: bool = True
    trace: bool = True  # the candidate side as one TorchScript graph, where it checks out (serving/traced.py)
    state_precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    state_ttl_s: int = Field(24 * 3600, ge=1)
    # cached user states held decoded in this process, MiB (serving/local_states.py; 0: off)
    state_cache_mb: int = Field(256, ge=0)
    # events the model reads per user, >= the bundle's training max_len (length extrapolation,
    # trainer/extrapolate.py); 0: the bundle's max_len
    max_len: int = Field(0, ge=0)
    store_max_len: int = Field(0, ge=0)  # events kept per user (0: the serving max_len)
    key_prefix: str = "lg"  # Redis key prefix, shared with `longer store load/check --key-prefix`
    watch_s: float = Field(0.0, ge=0)  # poll the bundle directory every N seconds, reload on change (0: off)
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # `longer serve`'s logging
    # near-line refresh of a user's cached state after /v1/events (serving/refresh.py): on/off,
    # and the most users waiting for one (beyond it, refreshes are dropped and counted)
    refresh: bool = True
    refresh_queue: int = Field(10_000, ge=1)

    @field_validator("threads", mode="before")
    @classmethod
    def _auto(cls, v):
        return (
            0 if isinstance(v, str) and v.strip().lower() in ("", AUTO) else v
        )  # trainer/threads.py's words

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """The environment's settings, with the `overrides` that are not None (flags) on top."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as e:
            raise SettingsError(_describe(e, given)) from None


def _describe(e: ValidationError, given: dict) -> str:
    """`LONGER_THREADS='x': Input should be a valid integer`, for each bad value (a flag's
    value is named by its setting, e.g. `threads=0`)."""
    parts = []
    for err in e.errors():
        loc = str(err["loc"][0]) if err["loc"] else "?"
        field = next((f for f, names in ENV_NAMES.items() if loc in names), loc)
        if field in given:
            where = f"{field}={given[field]!r}"
        else:
            var = next((v for v in ENV_NAMES.get(field, ()) if v in os.environ), ENV.get(field, loc))
            where = f"{var}={os.environ.get(var, err.get('input'))!r}"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _env_names(field: str) -> tuple[str, ...]:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(str(c) for c in alias.choices)
    return (f"LONGER_{field.upper()}",)


ENV_NAMES = {f: _env_names(f) for f in Settings.model_fields}
ENV = {f: names[0] for f, names in ENV_NAMES.items()}  # the variable of each setting
