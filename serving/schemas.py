"""Request and response bodies of the HTTP API (DESIGN.md "HTTP API").

Every request model is strict: unknown fields are refused, integers must be JSON integers
(no "5", true or 1.0), bounded to int64 — and times to unix seconds below
`feature_store.schema.MAX_TS_SECONDS`, the offline log's bound, so a millisecond `ts` is
refused here as it is by `longer build`. Strings must be valid unicode (no lone surrogate).
So nothing a client sends can overflow in numpy, torch or Redis.

`/v1/score`'s body is built from the loaded bundle's FeatureSpec (`request_models`), so its
fields, and the OpenAPI schema, are the bundle's; `ScoreRequest` below is the default spec's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, create_model, model_validator

from feature_store.schema import MAX_TS_SECONDS

INT64_MAX = 2**63 - 1


Id = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
Ts = Annotated[
    StrictInt,
    Field(
        ge=0,
        lt=MAX_TS_SECONDS,
        description=f"unix seconds, below {MAX_TS_SECONDS:.0e} (milliseconds are refused)",
    ),
]
Label = Annotated[StrictInt, Field(ge=0, le=1)]
EventId = Annotated[StrictStr, Field(max_length=128)]  # pydantic refuses lone surrogates


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Candidate(Strict):
    item_id: Id
    category_id: Id = Field(default=0, description="0 when unknown")


class HistoryEvent(Strict):
    item_id: Id
    ts: Ts
    category_id: Id = 0
    action: Id = 0
    label: Label = 0


class ScoreRequest(Strict):
    """The candidates come in one of two forms: `candidates`, a list of objects, or the columnar
    `item_ids` with the parallel `category_ids` (cheaper to build, send and validate for
    hundreds of candidates). Both are validated as strictly; the scores are the same."""

    user_id: Id
    candidates: list[Candidate] | None = Field(
        default=None, min_length=1, description="the candidates as objects (or give `item_ids`)"
    )
    item_ids: list[Id] | None = Field(
        default=None, min_length=1, description="the candidates' item ids, columnar (or give `candidates`)"
    )
    category_ids: list[Id] | None = Field(
        default=None,
        description="with `item_ids`: one category per item, in the same order (left out: the item "
        "table's, else 0)",
    )
    ts: Ts | None = Field(default=None, description="request time, unix seconds (default: now)")
    history: list[HistoryEvent] | None = Field(
        default=None, description="the user's events, used only when the online store is unreachable"
    )

    @model_validator(mode="after")
    def one_form(self) -> ScoreRequest:
        if (self.candidates is None) == (self.item_ids is None):
            raise ValueError("give the candidates as `candidates` (objects) or as `item_ids`, exactly one")
        if self.category_ids is not None:
            if self.item_ids is None:
                raise ValueError("`category_ids` goes with `item_ids`, not with `candidates`")
            if len(self.category_ids) != len(self.item_ids):
                raise ValueError(
                    f"`category_ids` has {len(self.category_ids)} entries, `item_ids` "
                    f"{len(self.item_ids)}: one category per item"
                )
        return self

    @property
    def candidate_field(self) -> str:
        return "item_ids" if self.item_ids is not None else "candidates"

    def columns(self) -> tuple[list[int], list[int]]:
        """(item ids, category ids) of the candidates, in request order, whichever the form."""
        if self.item_ids is not None:
            return self.item_ids, self.category_ids or [0] * len(self.item_ids)
        return [c.item_id for c in self.candidates], [c.category_id for c in self.candidates]


class ScoreResponse(BaseModel):
    model_version: str
    scores: list[float] = Field(description="click probability per candidate, in request order")
    user_state: Literal["hit", "incremental", "full", "bypass"]


class Event(HistoryEvent):
    """A history event of a user, posted to /v1/events."""

    user_id: Id
    event_id: EventId = Field(
        default="",
        description="makes the append idempotent (within the store's "
        "idempotency window: the user's retained events)",
    )


class EventsRequest(Strict):
    events: list[Event] = Field(min_length=1)


class EventsResponse(BaseModel):
    appended: int = Field(description="events really added: a repeated event_id is not counted")
    versions: dict[str, int] = Field(description="user_id → sequence version after the append")


class ProfileResult(BaseModel):
    user_id: int
    seq_version: int = Field(
        description="the user's sequence version after the write (bumped: cached states are stale)"
    )
    updated: list[str] = Field(description="the profile columns written")


class ModelInfo(BaseModel):
    model_version: str
    config: dict
    feature_schema: dict


class ReloadResult(BaseModel):
    model_version: str
    reloaded: bool
    previous: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "degraded"]
    model_version: str
    redis: str


class ErrorBody(BaseModel):
    detail: str


# --- request models built from the bundle's FeatureSpec (issue 15) ------------------------------

Dense = Annotated[float, Field(allow_inf_nan=False)]


@dataclass(frozen=True)
class RequestModels:
    """The request bodies one bundle's spec declares: `/v1/score`'s candidates carry the
    candidate columns (a list column: a list of ids) and the dense columns, its `context` the
    context columns. Every declared field is optional: one left out is filled in (a candidate
    column from the online store's item table, else the unknown bucket: id 0, an empty list, a
    dense column's train mean) and counted in /metrics; an undeclared one is a 422 naming it.

    `/v1/events`' events (and `/v1/score`'s fallback `history`) carry the spec's sequence
    columns (left out: 0, the unknown bucket; a list<int64> column: a list of ids, left out:
    the empty list). The online store holds at most its width W of ids per list column: a
    longer list posted to /v1/events is a 422 naming the event, the column and W
    (serving/features.py); the fallback history is never stored, so it has no such limit. `PUT /v1/users/{user_id}`'s body (`profile`) carries the spec's
    user columns, each optional: those given are upserted, the others kept."""

    candidate: type[BaseModel]
    context: type[BaseModel]
    score: type[BaseModel]
    history_event: type[BaseModel]
    events: type[BaseModel]
    profile: type[BaseModel]

    @property
    def components(self) -> dict[str, type[BaseModel]]:
        """The OpenAPI components these models replace (serving/app.py `spec_openapi`)."""
        return {"ScoreRequest": self.score, "EventsRequest": self.events, "UserProfile": self.profile}


def _id_field(spec, column: str):
    if spec.is_list(column):
        return (list[Id] | None, Field(default=None, description="list column; left out: the unknown bucket"))
    return (Id | None, Field(default=None, description="left out: the unknown bucket"))


def request_models(spec) -> RequestModels:
    """pydantic models (create_model) for a resolved `longer.spec.FeatureSpec`."""
    cand_fields = {c: _id_field(spec, c) for c in spec.candidate}
    cand_fields |= {
        c: (Dense | None, Field(default=None, description="dense column, raw; left out: its train mean"))
        for c in spec.dense
    }
    candidate = create_model("Candidate", __base__=Strict, item_id=(Id, ...), **cand_fields)
    context = create_model("Context", __base__=Strict, **{c: _id_field(spec, c) for c in spec.context})
    seq = {c: _sequence_field(spec, c) for c in spec.sequence if c not in HistoryEvent.model_fields}
    history_event = create_model("HistoryEvent", __base__=HistoryEvent, **seq)
    score = create_model(  # the columnar form (item_ids, category_ids) and its checks: ScoreRequest's
        "ScoreRequest",
        __base__=ScoreRequest,
        candidates=(
            list[candidate] | None,
            Field(default=None, min_length=1, description="the candidates as objects (or give `item_ids`)"),
        ),
        context=(context | None, Field(default=None, description="the request's context columns")),
        history=(
            list[history_event] | None,
            Field(
                default=None, description="the user's events, used only when the online store is unreachable"
            ),
        ),
    )
    event = create_model("Event", __base__=Event, **seq)
    events = create_model("EventsRequest", __base__=EventsRequest, events=(list[event], Field(min_length=1)))
    profile = create_model(
        "UserProfile",
        __base__=Strict,
        __doc__="The user's profile columns to upsert (the others are kept).",
        **{c: _profile_field(spec, c) for c in spec.user},
    )
    return RequestModels(candidate, context, score, history_event, events, profile)


def _sequence_field(spec, column: str):
    if spec.is_list(column):
        return (
            list[Id],
            Field(
                default_factory=list,
                description="list sequence column: the event's ids (at most the online store's "
                "width for it); left out: the empty list",
            ),
        )
    return (Id, Field(default=0, description="sequence column; left out: 0, the unknown bucket"))


def _profile_field(spec, column: str):
    if spec.is_list(column):
        return (list[Id] | None, Field(default=None, description="list column; left out: kept as stored"))
    return (Id | None, Field(default=None, description="left out: kept as stored"))
