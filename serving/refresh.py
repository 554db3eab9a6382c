"""Near-line refresh (`Refresher`): after `/v1/events` appends a user's events, that user's
cached state is brought up to date off the request path, so the user's next request is a hit.

* **Same path as a request.** A refresh is `UserStateCache.refresh` (serving/state_cache.py):
  an incremental update from the cached state where it can (append-stable bundle, events still
  held, same profile), else a full encode of every held event; written back with its tag. It
  shares the cache's single flight: a request arriving while its state is being refreshed
  waits for that computation instead of starting its own.
* **One refresh per user in flight.** A user already queued is not queued again (later events
  coalesce into the queued refresh, which reads whatever the store holds when it runs); events
  for a user whose refresh is running mark it to run once more afterwards.
* **Bounded, never blocking.** At most `LONGER_REFRESH_QUEUE` users wait; beyond that a
  refresh is dropped and counted (`longer_refresh_dropped_total`) — the user's next request
  computes its state itself (incremental or full). `/v1/events` never waits for a refresh.
* **Off switch.** `LONGER_REFRESH=false`: nothing is scheduled.
* **Clean shutdown.** `close()` (the app's lifespan end) cancels the worker tasks and waits for
  them; no task outlives the app. Workers start with the first scheduled refresh.

Metrics (serving/metrics.py): `longer_refresh_total{result}` (hit: nothing to do,
incremental, full, error), `longer_refresh_queue_depth`, `longer_refresh_seconds`,
`longer_refresh_dropped_total`, `longer_refresh_coalesced_total`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from .metrics import Metrics
from .runtime import ModelRuntime
from .state_cache import UserStateCache

log = logging.getLogger("longer.serving.refresh")

WORKERS = 1  # refreshes are background work: one at a time leaves the other compute slots
# (serving/runtime.py ComputeSlots) to requests


class Refresher:
    """The refresh queue and its workers (module docstring). `runtime()` gives the model to
    refresh with when a refresh runs (the service's current one, across reloads)."""

    def __init__(
        self,
        cache: UserStateCache,
        runtime: Callable[[], ModelRuntime],
        metrics: Metrics,
        enabled: bool = True,
        max_queue: int = 10_000,
    ):
        self.cache, self.runtime, self.metrics = cache, runtime, metrics
        self.enabled, self.max_queue = enabled, max_queue
        self.queue: asyncio.Queue[int] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queued: set[int] = set()  # waiting in the queue
        self.running: set[int] = set()
        self.again: set[int] = set()  # running, and new events came meanwhile
        self.workers: list[asyncio.Task] = []
        metrics.refresh_queue.set_function(lambda: len(self.queued))

    def schedule(self, users: Iterable[int]) -> None:
        """Queue a refresh of each user (coalesced, dropped when the queue is full); returns at
        once. Call from the event loop."""
        if not self.enabled:
            return
        for user in users:
            self._schedule(int(user))

    def _schedule(self, user: int) -> None:
        if user in self.queued:
            self.metrics.refresh_coalesced.inc()
            return
        if user in self.running:
            self.again.add(user)
            self.metrics.refresh_coalesced.inc()
            return
        self._start()
        try:
            self.queue.put_nowait(user)
        except asyncio.QueueFull:
            self.metrics.refresh_dropped.inc()
            return
        self.queued.add(user)

    def _start(self) -> None:
        """The queue and workers on the running loop (again, if an earlier loop has gone: an
        app driven by several `asyncio.run`s, as tests and the replay do)."""
        loop = asyncio.get_running_loop()
        if self.queue is not None and self.loop is loop:
            return
        self._forget()
        self.loop, self.queue = loop, asyncio.Queue(self.max_queue)
        self.workers = [asyncio.create_task(self._work(), name=f"longer-refresh-{i}") for i in range(WORKERS)]

    async def _work(self) -> None:
        while True:
            user = await self.queue.get()
            self.queued.discard(user)
            self.running.add(user)
            try:
                await self.refresh(user)
            finally:
                self.running.discard(user)
                self.queue.task_done()
            if user in self.again:
                self.again.discard(user)
                self._schedule(user)

    async def refresh(self, user: int) -> str:
        """One user's refresh, timed and counted; an error is logged and counted, never raised."""
        t0 = time.perf_counter()
        try:
            result = await self.cache.refresh(self.runtime(), user)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- a store error, a bad key: the next request recomputes
            log.debug("user %s: refresh failed: %s: %s", user, type(e).__name__, e)
            result = "error"
        self.metrics.refresh.labels(result).inc()
        self.metrics.refresh_latency.observe(time.perf_counter() - t0)
        return result

    async def idle(self) -> None:
        """Wait until every scheduled refresh has run (tests, the replay's end)."""
        while self.queue is not None and (self.queued or self.running or self.again):
            await self.queue.join()
            await asyncio.sleep(0)

    async def close(self) -> None:
        """Cancel the workers and wait for them (the app's shutdown)."""
        mine = [t for t in self.workers if t.get_loop() is asyncio.get_running_loop()]
        for task in mine:
            task.cancel()
        await asyncio.gather(*mine, return_exceptions=True)
        self.workers, self.queue = [], None
        self._forget()

    def _forget(self) -> None:
        """No user queued, running or due again (a new queue, or none)."""
        self.queued.clear()
        self.running.clear()
        self.again.clear()
