"""The online feature tables at serving time (issue 15): `FeatureTables` fills a /v1/score
request's left-out candidate columns from the store's item table, upserts a user's profile
(`PUT /v1/users/{user_id}`) and turns /v1/events' bodies into store events (a list sequence
column's ids at most the store's width for it, else `ListTooLong`: a 422). The Redis keys
are feature_store/online.py's; the model side (profile → user token) is serving/runtime.py's.

Fill-in order for a declared candidate column a candidate leaves out: the item table
(`{prefix}:i:<item_id>`, one pipelined read for all candidates, and only when some candidate
leaves out a column the store's table holds), else the unknown bucket (serving/runtime.py).
Each is counted in `longer_feature_fill_ins_total{column, source="item" | "unknown"}`. With
Redis unreachable the item table is skipped (the unknown bucket), never an error.

A profile write bumps the user's `seq_version` and drops the serving model's cached state in
one atomic script (`OnlineStore.put_profile`), so a state computed from the old profile is
never a hit; the user's profile enters the model on the next encode (a full one), which reads it
after the sequence version (serving/state_cache.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from feature_store.online import Appended, OnlineStore, list_widths, store_errors
from feature_store.online import Event as StoreEvent

from .runtime import ModelRuntime, as_columns

STORE_ERRORS = store_errors()
STORE_FIELDS = set(StoreEvent.__dataclass_fields__) - {"columns"}  # an event's fixed fields

Run = Callable[..., Awaitable]


class FeatureTables:
    """Item-table fill-ins, profile upserts and event conversion; `redis` runs a store call off
    the event loop, counting and logging its failures (serving/service.py)."""

    def __init__(self, store: OnlineStore, redis: Run):
        self.store, self.redis = store, redis

    def item_columns(self, rt: ModelRuntime) -> tuple[str, ...]:
        """The bundle's candidate columns that the store's item table holds."""
        return tuple(c for c in rt.spec.candidate if c in self.store.meta.candidate)

    async def fill_from_items(self, rt: ModelRuntime, given) -> tuple[dict[str, list], dict]:
        """({column: value per candidate} for the candidate columns the item table holds, a
        value left out taken from the table where it has one, else None), and the fill-ins
        {(column, "item"): count}. `given`: `CandidateColumns` or candidate objects
        (serving/runtime.py `as_columns`); the runtime reuses the lists. No store call when no
        candidate leaves out a column the table holds."""
        cols = as_columns(given, rt.spec)
        values = {c: cols.values(c) for c in self.item_columns(rt)}
        wanted = [c for c, vs in values.items() if None in vs]
        if not wanted:
            return values, {}
        need = sorted({k for c in wanted for k, v in enumerate(values[c]) if v is None})
        ids = cols.item_ids
        try:
            rows = await self.redis(self.store.read_items, [ids[k] for k in need], wanted, rt.spec)
        except STORE_ERRORS:  # counted and logged by `redis`: the unknown bucket
            return values, {}
        fills = {}
        for c in wanted:
            vs = values[c] = list(values[c])  # never the request's own list
            for k in need:
                found = rows.get(int(ids[k]), {}).get(c) if vs[k] is None else None
                if found is not None:
                    vs[k] = found
                    fills[(c, "item")] = fills.get((c, "item"), 0) + 1
        return values, fills

    async def put_profile(self, rt: ModelRuntime, user_id: int, profile) -> tuple[int, list[str]]:
        """Upsert the profile columns given (a `request_models(...).profile` body; a null is
        not given): (the user's new seq_version, the columns written). BadKeyError for a key of
        the wrong type."""
        values = profile.model_dump(exclude_none=True)
        return await self.redis(self.store.put_profile, user_id, values, rt.model_version), sorted(values)

    def store_events(self, rt: ModelRuntime, events: list) -> list[StoreEvent]:
        """/v1/events' events (`request_models(...).events`) as store events carrying the spec's
        sequence columns. ListTooLong for a list longer than the store's width for its column
        (reading the widths may be the store's first use: run it off the event loop)."""
        widths = list_widths(self.store.layout)
        extra = [c for c in rt.spec.sequence if c not in STORE_FIELDS]
        for i, e in enumerate(events):
            for c, w in widths.items():
                if len(getattr(e, c)) > w:
                    raise ListTooLong(i, c, w, len(getattr(e, c)))
        return [
            StoreEvent(**e.model_dump(include=STORE_FIELDS), columns={c: getattr(e, c) for c in extra})
            for e in events
        ]

    def append(self, rt: ModelRuntime, events: list) -> Appended:
        """`store_events`, appended (blocking: `redis` runs it)."""
        return self.store.append(self.store_events(rt, events))


class ListTooLong(ValueError):
    """A /v1/events list longer than the online store's width for its column (a 422)."""

    def __init__(self, index: int, column: str, width: int, got: int):
        self.index, self.column, self.width, self.got = index, column, width, got
        super().__init__(
            f"at most {width} ids in '{column}' (the online store's width for it, recorded by "
            f"`longer store load`), got {got}"
        )
