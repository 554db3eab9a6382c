"""The user-state cache policy of /v1/score, in one place: `UserStateCache`.

A request reads the head of the user's keys — how many events the list holds, the sequence
version (`seq_version`) and the cached UserState of the serving model (`model_version`) — in
one pipelined Redis round trip (`OnlineStore.read_head`), and the events themselves
(`OnlineStore.read`) only when that is not a hit; then:

* **hit** — the cached value decodes (feature_store/codec.py: format version, checksum) and
  its tag is exactly this request's: model version, user, sequence version and number of
  events used (`state_tag`). The candidates are scored against it. A value that decodes but
  then fails to score is logged and recomputed, as a miss.
* **miss** — no usable value: the state is encoded from the events strictly before the
  request time and the user's stored profile (read after the sequence version, and only when
  the bundle has user columns the store holds: serving/features.py), once for concurrent requests of the same (model, user, sequence, events)
  ("single flight"), and, if it used the whole current sequence, written back after the
  response is sent (a request with an earlier `ts` uses a prefix, which is not cached).
* **bypass** — Redis is unreachable: the state is encoded from the history in the request
  and nothing is written.

A value that fails to decode is logged with its reason (logger `longer.serving.state`); one
whose tag differs (an older sequence, another user's key, another model) is an ordinary miss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from feature_store import codec
from feature_store.online import EVENT_DTYPE, OnlineStore, sort_events, store_errors
from longer.interface import UserState

from .runtime import ModelRuntime

log = logging.getLogger("longer.serving.state")

STORE_ERRORS = store_errors()

Run = Callable[..., Awaitable]  # runs a blocking call off the event loop: run(fn, *args)


def state_tag(user_id: int, seq_version: int, n_events: int) -> dict:
    """What a cached UserState is bound to, besides the model version (which `dumps` adds): the
    user, the sequence version it was computed from and the number of events it used. The tag
    travels inside the codec value's meta, so a value copied to another user's key, or left
    from an older sequence, is a miss."""
    return {"user_id": int(user_id), "seq_version": int(seq_version), "n_events": int(n_events)}


def history_events(history: Sequence, before_ts: int, layout: np.dtype = EVENT_DTYPE) -> np.ndarray:
    """A request's own history (schemas.HistoryEvent objects) as sorted store events (in the
    store's `layout`) before `before_ts`."""
    rows = [tuple(getattr(e, c) for c in layout.names) for e in history]
    events = sort_events(np.array(rows, layout))
    return events[events["ts"] < before_ts]


class UserStateCache:
    """Read, validate, encode once, write back: see the module docstring.

    `run` executes model compute off the event loop; `redis` does the same for store calls and
    counts and logs their failures (serving/service.py). `precision`: fp32, fp16 or bf16 for the
    floating tensors of a cached value."""

    def __init__(self, store: OnlineStore, run: Run, redis: Run, precision: str = "fp32"):
        self.store, self.run, self.redis, self.precision = store, run, redis, precision
        self.inflight: dict[tuple, asyncio.Future] = {}

    # --- the cached form ---------------------------------------------------------------------------
    def dumps(self, rt: ModelRuntime, state: UserState, tag: dict) -> bytes:
        return codec.encode(state.tensors, self.precision, meta={"model_version": rt.model_version, **tag})

    def loads(self, rt: ModelRuntime, blob: bytes | None, tag: dict) -> UserState | None:
        """The cached state if it decodes and carries exactly this model version and `tag`."""
        return self.matching(rt, self.decoded(blob, tag["user_id"]), tag)

    @staticmethod
    def decoded(blob: bytes | None, user_id: int) -> tuple[UserState, dict] | None:
        """(state, meta) of a cached value; None if there is none or it does not decode (logged)."""
        if blob is None:
            return None
        try:
            tensors, meta = codec.decode(blob)
        except codec.CodecError as e:
            log.warning("user %s: cached state not decodable (%s), recomputing", user_id, e)
            return None
        return UserState(tensors), meta

    @staticmethod
    def matching(rt: ModelRuntime, decoded: tuple[UserState, dict] | None, tag: dict) -> UserState | None:
        if decoded is None or decoded[1] != {"model_version": rt.model_version, **tag}:
            return None  # stale (an older sequence) or not this user's: an ordinary miss
        return decoded[0]

    # --- the policy --------------------------------------------------------------------------------
    async def score(
        self,
        rt: ModelRuntime,
        user_id: int,
        ts: int,
        history: Sequence,
        score: Callable[[UserState], list[float]],
        defer: Callable,
    ) -> tuple[list[float], str]:
        """(scores, "hit" | "miss" | "bypass") for a request at `ts`. `score(state)` scores the
        candidates (blocking: it runs off the event loop); `defer(fn, *args)` runs the write-back
        after the response (BackgroundTasks).

        A hit costs one hop off the event loop: `read_hit` reads the store's head (no events),
        checks the cached state and scores it in the same worker thread."""
        try:
            scores, decoded = await self.redis(self.read_hit, rt, user_id, ts, score)
            if scores is not None:
                return scores, "hit"
            events, seq_version, _ = await self.redis(self.store.read, user_id, None)
            profile = await self.profile(rt, user_id)  # after the version: never newer-tagged than read
        except STORE_ERRORS:
            state = await self.run(rt.encode, user_id, history_events(history, ts, rt.layout))
            return await self.run(score, state), "bypass"
        used = events[events["ts"] < ts]  # point in time: strictly earlier events only
        tag = state_tag(user_id, seq_version, len(used))
        state = self.matching(rt, decoded, tag)  # the head's value (a list with unreadable items)
        if state is not None:
            try:
                return await self.run(score, state), "hit"
            except Exception as e:  # noqa: BLE001 -- a well-formed but unusable cached value: recompute it
                log.warning("user %s: cached state unusable (%s), recomputing", user_id, e)
        state = await self.encode_once(rt, (rt.model_version, user_id, seq_version, len(used)), used, profile)
        if len(used) == len(events):  # the state of the whole current sequence: cache it
            defer(self.write_back, rt, user_id, state, tag)
        return await self.run(score, state), "miss"

    def read_hit(
        self, rt: ModelRuntime, user_id: int, ts: int, score: Callable[[UserState], list[float]]
    ) -> tuple[list[float] | None, tuple | None]:
        """(scores, None) when the cached state is this request's; else (None, the decoded value
        to check against the full read's tag, or None). Blocking: the store read, the decode and
        the scoring all run in the calling thread.

        Without the events, "this request's" is: the tag names this model, user, seq_version and
        as many events as the list holds, and the state's latest event is strictly before `ts`.
        Then every held event is before `ts`, so the full read would build the same tag. Anything
        else (a request earlier than the latest event, a list with unreadable items) goes to the
        full read, which decides as before."""
        n_held, seq_version, blob = self.store.read_head(user_id, rt.model_version)
        decoded = self.decoded(blob, user_id)
        state = self.matching(rt, decoded, state_tag(user_id, seq_version, n_held))
        try:
            if state is None or not bool((state["latest_ts"] < ts).all()):
                return None, decoded
            return score(state), None
        except Exception as e:  # noqa: BLE001 -- a well-formed but unusable cached value: recompute it
            log.warning("user %s: cached state unusable (%s), recomputing", user_id, e)
            return None, None

    async def profile(self, rt: ModelRuntime, user_id: int) -> dict:
        """The user's stored profile for the bundle's user columns: one store call, none (no
        round trip) when the spec has no user column the store holds."""
        if not any(c in self.store.meta.user for c in rt.spec.user):
            return {}
        return await self.redis(self.store.read_profile, user_id, rt.spec)

    async def encode_once(self, rt: ModelRuntime, key: tuple, events: np.ndarray, profile: dict) -> UserState:
        """Concurrent misses for the same key (model, user, sequence, events) compute the state
        once (the profile is the sequence version's: a profile write bumps it)."""
        fut = self.inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            state = await self.run(rt.encode, key[1], events, profile)
            fut.set_result(state)
            return state
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            del self.inflight[key]

    async def write_back(self, rt: ModelRuntime, user_id: int, state: UserState, tag: dict) -> None:
        try:
            await self.redis(self.store.write_state, user_id, rt.model_version, self.dumps(rt, state, tag))
        except STORE_ERRORS as e:  # the next request recomputes it; `redis` counted and logged it
            log.debug("user %s: state write-back failed: %s", user_id, e)
