"""The cached user states this process holds decoded (`LocalStates`): an LRU bounded in bytes,
keyed by (model_version, user), each entry the stored value's digest and its decode.

It is a cache of decodes, never of decisions. A request still reads the user's head from the
store (serving/state_cache.py `UserStateCache.head`), passing the digest of the value held
(feature_store/online.py `read_head`): only when the stored value still ends with that digest
— the same bytes, so the same tensors and the same tag — is the held decode used, and no
state payload crosses the network; anything written since (a newer state by this or another
replica, a profile PUT's delete, a state of another model or sequence) comes back whole and
replaces it. The tag check that follows is exactly the one a value read from the store gets,
so a held decode can never be served for a state the store no longer holds.

Entries are put by that read and by the cache's write-back (the decode of the value written).
Size: `LONGER_STATE_CACHE_MB` (0: off; every hit reads and decodes the value, as before); an
entry larger than the whole budget is not kept. Thread-safe: the store calls that use it run
on the executor's threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

Key = tuple[str, int]  # (model_version, user)


class LocalStates:
    """LRU of (digest, decoded value) per (model_version, user), at most `max_bytes` in all
    (each entry's size as given to `put`: its tensors' bytes)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self._entries: OrderedDict[Key, tuple[bytes, Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> tuple[bytes, Any] | None:
        """(digest, decoded value) held for `key`, now the most recently used; None if none."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0], entry[1]

    def put(self, key: Key, digest: bytes, decoded: Any, nbytes: int) -> None:
        """Hold `decoded` (the value whose digest is `digest`) for `key`, evicting the least
        recently used entries beyond the budget; one larger than the budget is not held."""
        with self._lock:
            self._pop(key)
            if not digest or nbytes > self.max_bytes:
                return
            self._entries[key] = (digest, decoded, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self._pop(next(iter(self._entries)))

    def drop(self, key: Key) -> None:
        with self._lock:
            self._pop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def _pop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]
