"""The user-state cache policy of /v1/score (and of the near-line refresh), in one place:
`UserStateCache`.

A request reads the head of the user's keys — how many events the list holds, the sequence
version (`seq_version`), the event total `tot` and the cached UserState of the serving model
(`model_version`) — in one Redis round trip (`OnlineStore.read_head`; the state itself only
when it is not the value this process already holds decoded, serving/local_states.py), and events
(`OnlineStore.read_since`, one round trip: only the new ones where it can) only when that is
not a hit; then the outcome is one of:

* **hit** — the cached value decodes (feature_store/codec.py: format version, checksum) and
  its tag is exactly this request's: model version, user, sequence version, number of events
  used and the event total it covers (`state_tag`). The candidates are scored against it. A
  value that decodes but then fails to score is logged and recomputed, as a full encode.
* **incremental** — the cached value is this user's and model's, but for an older sequence,
  the bundle is append-stable (`ModelRuntime.incremental`), and the events appended since the
  total it covers are all still held (`read_since` reads only those): the state is brought up
  to date with them (`ModelRuntime.update` → `model.update_user`, equal to a full encode
  within 1e-5), once for concurrent requests, and written back. Only when every new event is
  strictly before the request time and after the state's latest event (else the sequence
  order or the point in time differs: full), at most max_len of them, and the stored profile
  is the one the state was computed with (its digest travels in the value's meta: a profile
  PUT, which also bumps `ver` and deletes the state, forces a full encode).
* **full** — no usable value: the state is encoded from the events strictly before the
  request time and the user's stored profile (read after the sequence version, and only when
  the bundle has user columns the store holds: serving/features.py), once for concurrent
  requests of the same (model, user, sequence, events) ("single flight"), and, if it used the
  whole current sequence, written back after the response is sent (a request with an earlier
  `ts` uses a prefix, which is not cached). A list with unreadable items (skipped on read)
  is placed on the grid by its readable events alone, and its state tagged with no event
  total, so no incremental update continues from it (the full read still finds it as a hit).
* **bypass** — Redis is unreachable (or its layout unknown: a spec store whose list widths
  were never read, feature_store/online.py): the state is encoded from the history in the
  request and nothing is written.

**The early score.** A hit read for a user whose state this process holds decoded
(serving/local_states.py) sends the head read's request, scores the held state, then reads the
reply (`OnlineStore.read_head_later`): Redis answers while the model computes. The scores
stand only if the reply shows the store still holds that very value and its tag is this
request's — exactly the hit the sequential read would find; otherwise they are dropped and the
outcome is decided as above. A held state of an older sequence version than this process itself
last wrote (`moved`: its /v1/events, PUT /v1/users) is not scored early; one made stale by
another replica's write is, and its scores dropped.

An incremental update and a full encode of the same (model, user, sequence version, event
total) are one single flight: a request arriving while the near-line refresh
(serving/refresh.py, `refresh`) computes that state waits for it.

A value that fails to decode is logged with its reason (logger `longer.serving.state`); one
whose tag differs (an older sequence, another user's key, another model) is an ordinary
incremental or full.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence

import numpy as np

from feature_store import codec
from feature_store.online import (
    LayoutError,
    OnlineStore,
    Since,
    event_dtype,
    padded,
    sort_events,
    store_errors,
)
from longer.interface import UserState
from longer.spec import FeatureSpec

from .local_states import LocalStates
from .runtime import ModelRuntime

log = logging.getLogger("longer.serving.state")

STORE_ERRORS = store_errors()

Run = Callable[..., Awaitable]  # runs a blocking call off the event loop: run(fn, *args)


OUTCOMES = ("hit", "incremental", "full", "bypass")  # /v1/score's `user_state`, the metrics' labels
EVERYTHING = 2**62  # a request time after every event: the refresh's
MOVED_USERS = 100_000  # users whose latest sequence version moved here `UserStateCache` keeps


def state_tag(user_id: int, seq_version: int, n_events: int, total: int) -> dict:
    """What a cached UserState is bound to, besides the model version (which `dumps` adds): the
    user, the sequence version it was computed from, the number of events it used and the
    user's event total up to the last of them (`tot`: what an incremental update continues
    from). The tag travels inside the codec value's meta, so a value copied to another user's
    key, or left from an older sequence, is not a hit."""
    return {
        "user_id": int(user_id),
        "seq_version": int(seq_version),
        "n_events": int(n_events),
        "total": int(total),
    }


def profile_digest(profile: dict) -> str:
    """A short digest of the profile a state was computed with (meta "profile")."""
    text = json.dumps(profile, sort_keys=True, default=int)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def history_events(history: Sequence, before_ts: int, spec: FeatureSpec | None = None) -> np.ndarray:
    """A request's own history (schemas.HistoryEvent objects) as sorted events of `spec`'s
    layout (a list column as wide as its longest list here) before `before_ts`."""
    spec = spec or FeatureSpec()
    lists = [c for c in spec.sequence if spec.is_list(c)]
    widths = {c: max((len(getattr(e, c)) for e in history), default=0) for c in lists}
    events = np.zeros(len(history), event_dtype(spec, widths))
    for c in events.dtype.names:
        values = [getattr(e, c) for e in history]
        events[c] = padded(values, widths[c]) if c in widths else values
    events = sort_events(events)
    return events[events["ts"] < before_ts]


Decoded = tuple[UserState, dict]  # a cached value: (state, meta)
Held = tuple[bytes, Decoded | None]  # a cached value's digest (b"": none) and its decode


def before(state: UserState, ts: int) -> bool:
    """Whether the state's latest event (so every event it covers) is strictly before `ts`."""
    return bool((state["latest_ts"] < ts).all())


def attempt(fn: Callable, *args) -> tuple[object, Exception | None]:
    """(fn(*args), None), or (None, the exception it raised)."""
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 -- handed to the caller, which decides
        return None, e


def local_key(rt: ModelRuntime, user_id: int) -> tuple[str, int]:
    """A user's entry in `LocalStates`: (model_version, user)."""
    return rt.model_version, int(user_id)


class UserStateCache:
    """Read, validate, update or encode once, write back: see the module docstring.

    `run` executes model compute off the event loop; `redis` does the same for store calls and
    counts and logs their failures (serving/service.py). `precision`: fp32, fp16 or bf16 for the
    floating tensors of a cached value. `local`: the stored values this process holds decoded
    (off by default); `counted(result)` is called with "hit" when a held decode was used and
    "miss" when a stored value was read and decoded (the metrics' `longer_state_local_total`)."""

    def __init__(
        self,
        store: OnlineStore,
        run: Run,
        redis: Run,
        precision: str = "fp32",
        local: LocalStates | None = None,
        counted: Callable[[str], None] = lambda result: None,
    ):
        self.store, self.run, self.redis, self.precision = store, run, redis, precision
        self.local, self.counted = LocalStates(0) if local is None else local, counted
        self.inflight: dict[tuple, asyncio.Future] = {}
        self.versions: OrderedDict[int, int] = OrderedDict()  # `moved`: user → seq_version

    def moved(self, versions: Mapping[int, int]) -> None:
        """The users whose sequence version this process just moved (its /v1/events, PUT
        /v1/users), at the versions the store answered: a state held for an older one is known
        stale, so a hit read does not score it early (`head`). The latest MOVED_USERS users."""
        for user, version in versions.items():
            self.versions[int(user)] = int(version)
            self.versions.move_to_end(int(user))
        while len(self.versions) > MOVED_USERS:
            self.versions.popitem(last=False)

    def known_stale(self, decoded: Decoded, user_id: int) -> bool:
        """Whether a held value is older than the sequence version this process last moved
        the user's to (`moved`)."""
        return decoded[1].get("seq_version", -1) < self.versions.get(int(user_id), -1)

    # --- the cached form ---------------------------------------------------------------------------
    def dumps(self, rt: ModelRuntime, state: UserState, tag: dict, profile: dict | None = None) -> bytes:
        meta = {"model_version": rt.model_version, **tag, "profile": profile_digest(profile or {})}
        return codec.encode(state.tensors, self.precision, meta=meta)

    def loads(self, rt: ModelRuntime, blob: bytes | None, tag: dict) -> UserState | None:
        """The cached state if it decodes and carries exactly this model version and `tag`."""
        return self.matching(rt, self.decoded(blob, tag["user_id"]), tag)

    @staticmethod
    def decoded(blob: bytes | None, user_id: int) -> Decoded | None:
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
    def matching(rt: ModelRuntime, decoded: Decoded | None, tag: dict) -> UserState | None:
        """The cached state if it carries exactly this model version and `tag` (its profile
        digest aside: a profile write bumps the sequence version anyway)."""
        if decoded is None:
            return None
        meta = {k: v for k, v in decoded[1].items() if k != "profile"}
        if meta != {"model_version": rt.model_version, **tag}:
            return None  # stale (an older sequence) or not this user's
        return decoded[0]

    def head(self, rt: ModelRuntime, user_id: int, early: Callable | None = None, ts: int = 0) -> tuple:
        """(events held, seq_version, event total, (digest, decoded value) of the cached state,
        `early`'s result) in one round trip; the state from `local` when the store still holds
        that very value (no payload, no decode), else as read (and then held). Blocking.

        `early(state)`, if given, runs on the held state while the store answers
        (`read_head_later`) when `may_score_early` allows it; its `attempt` (result, exception)
        is returned when the store still holds that value, else None (and None when it did not
        run)."""
        key = local_key(rt, user_id)
        held = self.local.get(key)
        reply = self.store.read_head_later(user_id, rt.model_version, held[0] if held else b"")
        tried = None
        try:
            if early is not None and held is not None and self.may_score_early(held[1], user_id, ts):
                tried = attempt(early, held[1][0])
        finally:
            n_held, seq_version, blob, total = reply()
        if held is not None and blob == held[0]:
            self.counted("hit")
            return n_held, seq_version, total, held, tried
        return n_held, seq_version, total, self.remember(key, blob), None

    def may_score_early(self, decoded: Decoded, user_id: int, ts: int) -> bool:
        """Whether a hit read scores this held value before the store's reply (`head`): unless
        its latest event is not before `ts` or it is `known_stale`."""
        return not self.known_stale(decoded, user_id) and bool(attempt(before, decoded[0], ts)[0])

    def remember(self, key: tuple[str, int], blob: bytes | None) -> Held:
        """(digest, decoded value) of a value just read from the store for `key` (counted a
        "miss" of `local`), now held there."""
        if blob is not None:
            self.counted("miss")
        return self.hold(key, blob)

    def hold(self, key: tuple[str, int], blob: bytes | None) -> Held:
        """(digest, decoded value) of the store's value for `key`, held in `local` (or no
        longer, when there is none or it does not decode)."""
        decoded = self.decoded(blob, key[1])
        if decoded is None:
            self.local.drop(key)
            return codec.digest(blob), None
        size = sum(t.nbytes for t in decoded[0].tensors.values())
        self.local.put(key, codec.digest(blob), decoded, size)
        return codec.digest(blob), decoded

    def since(self, rt: ModelRuntime, decoded: Decoded | None, user_id: int) -> int | None:
        """The event total a cached value of this user and model covers, if an incremental
        update can continue from it: an append-stable bundle and fp32 values (an update of a
        rounded state would drift from a full encode, update after update); else None."""
        if decoded is None or not rt.incremental or self.precision != "fp32":
            return None
        meta = decoded[1]
        total = meta.get("total")
        mine = meta.get("model_version") == rt.model_version and meta.get("user_id") == int(user_id)
        return total if mine and isinstance(total, int) and total >= 0 else None

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
        """(scores, "hit" | "incremental" | "full" | "bypass") for a request at `ts`.
        `score(state)` scores the candidates (blocking: it runs off the event loop, or on it
        for a request alone in the server); `defer(fn, *args)` runs the write-back after the
        response (BackgroundTasks).

        A hit costs one hop off the event loop, or none for a request alone in the server
        (serving/hops.py): `read_hit` reads the store's head (no events), checks the cached
        state and scores it in the same thread."""
        try:
            scores, head = await self.redis(self.read_hit, rt, user_id, ts, score, alone=True)
            if scores is not None:
                return scores, "hit"
            state, outcome = await self.current(rt, user_id, ts, head, defer)
            if outcome == "hit":  # the full read's tag matched (a list with unreadable items)
                try:
                    return await self.run(score, state), "hit"
                except Exception as e:  # noqa: BLE001 -- a well-formed but unusable cached value: recompute it
                    log.warning("user %s: cached state unusable (%s), recomputing", user_id, e)
                    state, outcome = await self.current(rt, user_id, ts, (b"", None), defer)
        except (*STORE_ERRORS, LayoutError):  # a store whose list widths are unreadable: as unreachable
            state = await self.run(rt.encode, user_id, history_events(history, ts, rt.spec))
            return await self.run(score, state), "bypass"
        return await self.run(score, state), outcome

    async def refresh(self, rt: ModelRuntime, user_id: int) -> str:
        """Bring the user's cached state up to date with every event the store holds, off the
        request path (serving/refresh.py): "hit" (nothing to do), "incremental" or "full".
        Store errors propagate (the refresher counts them)."""
        _, head = await self.redis(self.read_hit, rt, user_id, EVERYTHING, None)
        if head is None:
            return "hit"
        written: list = []
        _, outcome = await self.current(rt, user_id, EVERYTHING, head, lambda *a: written.append(a))
        for fn, *args in written:
            await fn(*args)
        return outcome

    def read_hit(
        self, rt: ModelRuntime, user_id: int, ts: int, score: Callable[[UserState], list[float]] | None
    ) -> tuple[list[float] | None, tuple | None]:
        """(scores, None) when the cached state is this request's; else (None, (digest, decoded
        value)) for `current`. Without `score` (the refresh), a hit is ([], None). Blocking: the
        store read, the decode and the scoring all run in the calling thread.

        Without the events, "this request's" is: the tag names this model, user, seq_version, as
        many events as the list holds and the store's event total, and the state's latest
        event is strictly before `ts`. Then every held event is before `ts`, so the full read
        would build the same tag. Anything else (a request earlier than the latest event, a
        list with unreadable items) goes to `current`, which decides as before."""
        n_held, seq_version, total, (digest, decoded), tried = self.head(rt, user_id, score, ts)
        state = self.matching(rt, decoded, state_tag(user_id, seq_version, n_held, total))
        if state is None:
            return None, (digest, decoded)
        fresh, error = attempt(before, state, ts)
        if error is None:
            if not fresh:
                return None, (digest, decoded)
            if score is None:
                return [], None
            scores, error = tried if tried is not None else attempt(score, state)
        if error is not None:  # a well-formed but unusable cached value: recompute it
            log.warning("user %s: cached state unusable (%s), recomputing", user_id, error)
            self.local.drop(local_key(rt, user_id))
            return None, (b"", None)
        return scores, None

    async def current(
        self, rt: ModelRuntime, user_id: int, ts: int, head: tuple, defer: Callable
    ) -> tuple[UserState, str]:
        """The user's state for a request at `ts` when the head was no hit: (state, "hit" |
        "incremental" | "full"). `head`: read_hit's (digest, decoded value)."""
        digest, decoded = head
        key = local_key(rt, user_id)
        since = self.since(rt, decoded, user_id)
        r = await self.redis(self.store.read_since, user_id, since, rt.model_version)
        profile = await self.profile(rt, user_id)  # after the version: never newer-tagged than read
        if codec.digest(r.blob) != digest:  # written since the head was read
            digest, decoded = self.remember(key, r.blob)
        if since is not None and r.complete:
            base = self.incremental_base(rt, user_id, decoded, since, r, ts, profile)
            if base is not None:
                key = (rt.model_version, user_id, r.seq_version, r.total)
                state = await self.once(key, rt.update, base, user_id, r.events, profile, r.total)
                tag = state_tag(user_id, r.seq_version, r.held, r.total)
                defer(self.write_back, rt, user_id, state, tag, profile)
                return state, "incremental"
            r = await self.redis(self.store.read_since, user_id, None, rt.model_version)  # every event
            profile = await self.profile(rt, user_id)
            if codec.digest(r.blob) != digest:
                digest, decoded = self.remember(key, r.blob)
        events = r.events
        used = events[events["ts"] < ts]  # point in time: strictly earlier events only
        total = r.total - (len(events) - len(used))
        tag = state_tag(user_id, r.seq_version, len(used), total)
        unreadable = len(events) < r.held  # items skipped on read
        state = self.matching(rt, decoded, tag)
        if state is None and unreadable:
            state = self.matching(rt, decoded, {**tag, "total": -1})
        if state is not None:
            return state, "hit"
        if unreadable:  # place only the readable events on the grid, and tag no total an
            total, tag["total"] = len(used), -1  # incremental update could continue from
        state = await self.once(
            (rt.model_version, user_id, r.seq_version, total), rt.encode, user_id, used, profile, total
        )
        if len(used) == len(events):  # the state of the whole current sequence: cache it
            defer(self.write_back, rt, user_id, state, tag, profile)
        return state, "full"

    def incremental_base(
        self,
        rt: ModelRuntime,
        user_id: int,
        decoded: Decoded | None,
        since: int,
        r: Since,
        ts: int,
        profile: dict,
    ) -> UserState | None:
        """The cached state to update with `r.events` (the events after its total), or None
        when the update would not equal a full encode of this request's events (module
        docstring; an unreadable item among the new events, skipped on read: full too)."""
        new = r.events
        if decoded is None or self.since(rt, decoded, user_id) != since or len(new) != r.total - since:
            return None
        state, meta = decoded
        if meta.get("profile") != profile_digest(profile) or len(new) > rt.max_len:
            return None
        if len(new) and not (int(new["ts"].max()) < ts and int(new["ts"].min()) > int(state["latest_ts"][0])):
            return None  # a new event at or after the request time, or out of order
        return state

    async def profile(self, rt: ModelRuntime, user_id: int) -> dict:
        """The user's stored profile for the bundle's user columns: one store call, none (no
        round trip) when the spec has no user column the store holds."""
        if not any(c in self.store.meta.user for c in rt.spec.user):
            return {}
        return await self.redis(self.store.read_profile, user_id, rt.spec)

    async def once(self, key: tuple, fn: Callable, *args) -> UserState:
        """Concurrent computations of the same state — key (model, user, sequence version,
        event total), by a full encode or an incremental update — run once (the profile is the
        sequence version's: a profile write bumps it)."""
        fut = self.inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            state = await self.run(fn, *args)
            fut.set_result(state)
            return state
        except asyncio.CancelledError:  # (a refresh cancelled at shutdown) its waiters see it too
            fut.cancel()
            raise
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: each waiter re-raises it; none waiting is nothing to log
            raise
        finally:
            del self.inflight[key]

    async def write_back(
        self, rt: ModelRuntime, user_id: int, state: UserState, tag: dict, profile: dict
    ) -> None:
        try:
            blob = self.dumps(rt, state, tag, profile)
            await self.redis(self.write_state, rt, user_id, blob)
        except STORE_ERRORS as e:  # the next request recomputes it; `redis` counted and logged it
            log.debug("user %s: state write-back failed: %s", user_id, e)

    def write_state(self, rt: ModelRuntime, user_id: int, blob: bytes) -> None:
        """Write a cached value and hold its decode in `local` (what the next read of it would
        give), or no longer hold one when the store refused it (too large). Blocking."""
        key = local_key(rt, user_id)
        if self.store.write_state(user_id, rt.model_version, blob) and self.local.max_bytes:
            self.hold(key, blob)
        else:
            self.local.drop(key)
