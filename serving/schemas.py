"""Request and response bodies of the HTTP API (DESIGN.md "HTTP API"). Unknown fields are refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Id = Field(ge=0, le=2**63 - 1)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Candidate(Strict):
    item_id: int = Id
    category_id: int = Field(default=0, ge=0, le=2**63 - 1, description="0 when unknown")


class HistoryEvent(Strict):
    item_id: int = Id
    ts: int = Field(ge=0, description="unix seconds")
    category_id: int = Field(default=0, ge=0)
    action: int = Field(default=0, ge=0)
    label: int = Field(default=0, ge=0, le=1)


class ScoreRequest(Strict):
    user_id: int = Id
    candidates: list[Candidate] = Field(min_length=1)
    ts: int | None = Field(default=None, ge=0, description="request time, unix seconds (default: now)")
    history: list[HistoryEvent] | None = Field(
        default=None, description="the user's events, used only when the online store is unreachable")


class ScoreResponse(BaseModel):
    model_version: str
    scores: list[float] = Field(description="click probability per candidate, in request order")
    user_state: Literal["hit", "miss", "bypass"]


class Event(Strict):
    user_id: int = Id
    item_id: int = Id
    ts: int = Field(ge=0, description="unix seconds")
    category_id: int = Field(default=0, ge=0)
    action: int = Field(default=0, ge=0)
    label: int = Field(default=0, ge=0, le=1)
    event_id: str = Field(default="", max_length=128, description="makes the append idempotent")


class EventsRequest(Strict):
    events: list[Event] = Field(min_length=1)


class EventsResponse(BaseModel):
    appended: int
    versions: dict[str, int] = Field(description="user_id → sequence version after the append")


class ModelInfo(BaseModel):
    model_version: str
    config: dict
    feature_schema: dict
