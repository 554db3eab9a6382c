"""Where the service's blocking calls run (`Hops`): in its thread pool, off the event loop — or,
for a /v1/score request alone in the server, its hit read (store head, early score:
serving/state_cache.py `read_hit`) on the event loop's own thread, with no hop.

Why. A hop to a pool thread and back wakes two sleeping threads, and the GIL changes hands
between them several times: at L 1,000 with 100 candidates and one client, `longer serve` made
10 context switches per hit through the pool and 1.1 inline, its CPU per hit fell from 3.73 to
3.38 ms and the p50 from 3.82 to 3.44 ms (`perf stat` on the server, 1,200 hits each).

When. A call offered inline (`alone=True`) runs inline only while all of these hold, and hops
to the pool otherwise, as every other call does:

* LONGER_IDLE_INLINE is on (the default);
* its request is the only HTTP request in the app: `InFlight`, the outermost middleware, counts
  them from arrival to the response's end, and the caller first yields to the event loop once
  (`settle`), so requests that arrived with this one are counted. (Counted at the route
  instead, each of 8 clients' requests found itself alone there — the others were still
  reading their bodies — and ran inline: 8 clients got one core, and requests/s at
  L 2,000 × 500 fell from 145 to 100);
* no call is in the pool (queued or running: `pooled`), so every compute slot is free and the
  inline call waits on nothing but its own work;
* the store's last call succeeded (a Redis that stopped answering would hold the event loop
  for its socket timeout; after a failure the next calls hop until one succeeds).

What it costs. A request that arrives while another is scored inline is read when that one is
done — up to one score later — where a hop would have let it start at once on the other core.
Under load no request is alone and every call hops: throughput is the pool's.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor


class Hops:
    def __init__(self, inline: bool = True):
        self.inline = inline
        self.requests = 0  # HTTP requests in the app (`InFlight`; event loop thread only)
        self.pooled = 0  # calls handed to the pool and not yet returned there
        self.store_ok = True  # the store's last call succeeded
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around one HTTP request (`InFlight`)."""
        self.requests += 1
        try:
            yield
        finally:
            self.requests -= 1

    def alone(self) -> bool:
        """Whether a call offered inline runs inline now (module docstring; after `settle`)."""
        return self.inline and self.requests <= 1 and self.pooled == 0 and self.store_ok

    async def settle(self) -> None:
        """Yield to the event loop once, so requests that arrived with this one are counted."""
        if self.inline:
            await asyncio.sleep(0)

    def submit(self, loop: asyncio.AbstractEventLoop, pool: Executor, fn: Callable, *args) -> asyncio.Future:
        """`fn(*args)` in `pool`, counted in `pooled` from now until it returns there (a call
        whose awaiting request was cancelled still counts while it runs)."""
        with self._lock:
            self.pooled += 1

        def call():
            try:
                return fn(*args)
            finally:
                self._returned()

        try:
            return loop.run_in_executor(pool, call)
        except BaseException:  # not submitted (a pool shut down)
            self._returned()
            raise

    def _returned(self) -> None:
        with self._lock:
            self.pooled -= 1


class InFlight:
    """Pure ASGI: every HTTP request counted in `hops.requests` while the app handles it."""

    def __init__(self, app, hops: Hops):
        self.app, self.hops = app, hops

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        with self.hops.request():
            return await self.app(scope, receive, send)
