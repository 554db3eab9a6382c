"""`longer store check [--repair]`: find the online store's keys that the service cannot use
(feature_store/online.py's key map), and mend them without losing a valid event.

Every key under `{prefix}:{u*}:*` is visited with SCAN (never KEYS; on Redis Cluster, every
primary), in pipelined batches. What is checked, and what `--repair` does:

    seq   a list of packed events     wrong type → deleted (it holds no readable event);
                                      malformed items → removed one value at a time (LREM),
                                      so valid events — and concurrent appends — stay
    ver   a non-negative integer      unreadable or wrong type → set to the current time in
                                      milliseconds: above any version a cached state carries
    tot   a non-negative integer      unreadable or wrong type → deleted (the next append
                                      counts on from the list's length; the user's cached
                                      states are deleted and the version moved forward)
    ids   a sorted set                wrong type → deleted (only the idempotency window is
                                      lost); a `set` from an older version → deleted likewise
    st:*  a string (codec bytes)      wrong type → deleted (a cache; the service also treats
                                      it as no hit)
    prof  a hash (the profile)        wrong type → deleted (the profile is lost: reload it with
                                      `longer store load` or PUT /v1/users/{user_id})

Packed events are checked against the store's recorded layout (`{prefix}:meta`, its
`event_fields` and list `widths`; none recorded: the default layout).

A repair that touches a user's `seq`, `ver` or `tot` moves the version forward and deletes the
user's cached states, so no state computed before the repair is ever served after it. A key
that matches the pattern but not the key map is reported and left alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice

from tqdm import tqdm

from .online import BadKeyError, StoreMeta, parse_counter, parse_seq_version

EXPECTED = {"seq": "list", "ver": "string", "tot": "string", "ids": "zset", "st": "string", "prof": "hash"}


@dataclass
class Problem:
    key: str
    problem: str
    repair: str  # what --repair does (or did)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _batches(keys: Iterable, n: int) -> Iterator[list[str]]:
    it = iter(keys)
    while batch := [_text(k) for k in islice(it, n)]:
        yield batch


class StoreCheck:
    def __init__(self, client, prefix: str = "lg", batch: int = 500):
        self.r, self.prefix, self.batch = client, prefix, batch
        self.user_key = re.compile(rf"^{re.escape(prefix)}:\{{u(\d+)\}}:(seq|ver|tot|ids|prof|st:.+)$")
        raw = client.get(f"{prefix}:meta")
        meta = StoreMeta.from_json(f"{prefix}:meta", raw) if raw is not None else StoreMeta()
        self.event_bytes = meta.layout.itemsize

    def keys(self, pattern: str | None = None) -> Iterator[str]:
        return self.r.scan_iter(match=pattern or f"{self.prefix}:{{u*}}:*", count=1000)

    def run(self, repair: bool = False, progress: bool = False) -> dict:
        found: dict[int, list[Problem]] = {}
        other: list[Problem] = []
        scanned = 0
        with tqdm(desc="store check", unit="key", disable=not progress) as bar:
            for keys in _batches(self.keys(), self.batch):
                for key, problem in self.check_batch(keys):
                    m = self.user_key.match(key)
                    (found.setdefault(int(m.group(1)), []) if m else other).append(problem)
                scanned += len(keys)
                bar.update(len(keys))
        if repair and found:
            states = self.states_of(set(found))
            for user, problems in found.items():
                self.repair_user(user, problems, states.get(user, []))
        problems = [asdict(p) for ps in found.values() for p in ps] + [asdict(p) for p in other]
        return {
            "prefix": self.prefix,
            "keys_scanned": scanned,
            "users_with_problems": len(found),
            "problems": problems,
            "repaired": bool(repair and found),
            "ok": not problems or bool(repair),
        }

    def check_batch(self, keys: list[str]) -> Iterator[tuple[str, Problem]]:
        p = self.r.pipeline(transaction=False)
        for k in keys:
            p.type(k)
        types = [_text(t) for t in p.execute()]
        p = self.r.pipeline(transaction=False)
        reads = []
        for k, t in zip(keys, types):
            kind = self._kind(k)
            if kind == "seq" and t == "list":
                p.lrange(k, 0, -1)
                reads.append(k)
            elif kind in ("ver", "tot") and t == "string":
                p.get(k)
                reads.append(k)
        values = dict(zip(reads, p.execute())) if reads else {}
        for k, t in zip(keys, types):
            problem = self.problem(k, t, values.get(k))
            if problem is not None:
                yield k, problem

    def _kind(self, key: str) -> str | None:
        m = self.user_key.match(key)
        return m.group(2).split(":", 1)[0] if m else None

    def problem(self, key: str, type_: str, value) -> Problem | None:
        kind = self._kind(key)
        if kind is None:
            return Problem(key, "not a key of the key map", "left alone")
        if type_ == "none":  # deleted since the scan saw it
            return None
        if type_ != EXPECTED[kind]:
            action = {
                "seq": "delete (no readable event in it)",
                "ver": "set to the current time in ms",
                "tot": "delete (counted again from the list's length)",
                "ids": "delete (the idempotency window restarts)",
                "st": "delete (a cache entry)",
                "prof": "delete (reload the profile)",
            }[kind]
            return Problem(key, f"holds a {type_}, expected a {EXPECTED[kind]}", action)
        if kind == "seq":
            bad = sum(1 for item in value or () if len(item) != self.event_bytes)
            if bad:
                return Problem(
                    key,
                    f"{bad} of {len(value)} items are not {self.event_bytes}-byte packed events",
                    "remove those items, keep the valid events",
                )
        if kind == "ver":
            try:
                parse_seq_version(key, value)
            except BadKeyError as e:
                return Problem(key, e.problem, "set to the current time in ms")
        if kind == "tot" and value is not None:
            try:
                parse_counter(key, value, "an event total")
            except BadKeyError as e:
                return Problem(key, e.problem, "delete (counted again from the list's length)")
        return None

    def states_of(self, users: set[int]) -> dict[int, list[str]]:
        """The cached-state keys of these users (one more SCAN)."""
        out: dict[int, list[str]] = {}
        for keys in _batches(self.keys(f"{self.prefix}:{{u*}}:st:*"), self.batch):
            for k in keys:
                m = self.user_key.match(k)
                if m and int(m.group(1)) in users:
                    out.setdefault(int(m.group(1)), []).append(k)
        return out

    def repair_user(self, user: int, problems: list[Problem], states: list[str]) -> None:
        key = lambda what: f"{self.prefix}:{{u{user}}}:{what}"  # noqa: E731
        kinds = {self._kind(p.key) for p in problems}
        for p in problems:
            if self._kind(p.key) == "seq" and p.problem.startswith("holds"):
                self.r.delete(p.key)
            elif self._kind(p.key) == "seq":  # LREM of each malformed value: valid and concurrent events stay
                for item in {i for i in self.r.lrange(p.key, 0, -1) if len(i) != self.event_bytes}:
                    self.r.lrem(p.key, 0, item)
            elif self._kind(p.key) in ("tot", "ids", "st", "prof"):
                self.r.delete(p.key)
        if kinds & {"seq", "ver", "tot"}:
            if "ver" in kinds:
                self.r.set(key("ver"), int(time.time() * 1000))
            else:
                self.r.incr(key("ver"))
            if states:
                self.r.delete(*states)


def check_store(client, prefix: str = "lg", repair: bool = False, progress: bool = False) -> dict:
    return StoreCheck(client, prefix).run(repair=repair, progress=progress)
