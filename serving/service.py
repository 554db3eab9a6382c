"""The state one app shares between requests (`Service`): settings, the model runtime, the
online store, the thread pool for model and store calls, the metrics, the user-state cache and
its near-line refresher (serving/refresh.py);
and what changes it over time: `reload` (a new bundle) and the bundle watcher.

Logs: a line per reload (old → new model_version) and per failed watcher reload with its
reason (logger `longer.serving.reload`); Redis errors as bursts (`longer.serving.redis`): the first error of a burst at once,
then at most one line per `REDIS_LOG_EVERY_S` with the count since (`ErrorBurstLog`), and a line
when Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from feature_store.online import LayoutError, OnlineStore, connect, store_errors
from trainer.export import BundleError, declared_version

from . import heap
from .features import FeatureTables
from .hops import Hops
from .local_states import LocalStates
from .metrics import Metrics
from .refresh import Refresher
from .runtime import ModelRuntime
from .settings import Settings
from .state_cache import UserStateCache

log = logging.getLogger("longer.serving.reload")

STORE_ERRORS = store_errors()
REDIS_LOG_EVERY_S = 10.0


class ErrorBurstLog:
    """Errors of one kind as a few log lines, not one per request: the first error of a burst,
    then a count per `every_s` (logged when the next error comes after it), then "recovered"
    with the errors since the last line on the next success."""

    def __init__(self, logger: logging.Logger, what: str, every_s: float, clock=time.monotonic):
        self.log, self.what, self.every_s, self.clock = logger, what, every_s, clock
        self.in_burst, self.count, self.since = False, 0, 0.0

    def error(self, e: BaseException) -> None:
        now = self.clock()
        if not self.in_burst:
            self.in_burst, self.count, self.since = True, 0, now
            self.log.warning("%s failed: %s: %s", self.what, type(e).__name__, e)
            return
        self.count += 1
        if now - self.since >= self.every_s:
            self.log.warning(
                "%s failed %d more times in %.0f s (last: %s: %s)",
                self.what,
                self.count,
                now - self.since,
                type(e).__name__,
                e,
            )
            self.count, self.since = 0, now

    def ok(self) -> None:
        if self.in_burst:
            self.log.warning("%s answers again (%d more failures before that)", self.what, self.count)
            self.in_burst = False


class Service:
    """Shared state of one app: model runtime, store, executor, metrics, user-state cache,
    feature tables. The store's event layout is the bundle's (`LayoutError` at start, or a
    refused reload, otherwise: feature_store/online.py)."""

    def __init__(
        self, settings: Settings, runtime: ModelRuntime | None = None, store: OnlineStore | None = None
    ):
        self.settings = settings
        self.reload_lock = asyncio.Lock()
        self.runtime = runtime or self.load_runtime()
        self.store = store or OnlineStore(
            connect(settings.redis_url or None),
            max_len=settings.store_max_len or self.runtime.max_len,
            prefix=settings.key_prefix,
            state_ttl_s=settings.state_ttl_s,
            spec=self.runtime.spec,  # list widths: the store's meta record
        )
        self.same_layout(self.runtime)
        try:  # the store's layout (list widths) and tables; unreachable now: read on first use, /readyz
            self.store.check_layout()
        except STORE_ERRORS as e:
            log.warning("online store unreachable at start (%s); its layout is checked on /readyz", e)
        # a thread per compute slot (serving/runtime.py ComputeSlots) and one more, so a store
        # call (a request's Redis read) never waits behind the model calls
        self.pool = ThreadPoolExecutor(
            max_workers=self.runtime.slots.slots + 1, thread_name_prefix="longer-model"
        )
        self.hops = Hops(settings.idle_inline)  # which calls run in the pool (serving/hops.py)
        self.metrics = Metrics()
        self.metrics.model.labels(self.runtime.model_version).set(1)
        self.redis_log = ErrorBurstLog(logging.getLogger("longer.serving.redis"), "Redis", REDIS_LOG_EVERY_S)
        self.cache = UserStateCache(
            self.store,
            self.run,
            self.redis,
            settings.state_precision,
            LocalStates(settings.state_cache_mb << 20),
            lambda result: self.metrics.state_local.labels(result).inc(),
        )
        self.metrics.state_local_bytes.set_function(lambda: self.cache.local.bytes)
        self.features = FeatureTables(self.store, self.redis)
        self.refresher = Refresher(
            self.cache, lambda: self.runtime, self.metrics, settings.refresh, settings.refresh_queue
        )

    def load_runtime(self) -> ModelRuntime:
        """The settings' bundle as a ModelRuntime (at start and on each reload; blocking)."""
        return ModelRuntime.from_settings(self.settings)

    def settle_heap(self) -> None:
        """The loaded heap out of full garbage collections (serving/heap.py), unless
        LONGER_FREEZE_HEAP is off."""
        if self.settings.freeze_heap:
            heap.settle()

    def same_layout(self, runtime: ModelRuntime) -> None:
        """LayoutError unless `runtime`'s bundle packs events as the store does (a hot reload
        to a bundle whose sequence columns differ needs a store loaded for it: a restart)."""
        self.store.check_spec(runtime.spec)

    async def run(self, fn, *args):
        return await self.hops.submit(asyncio.get_running_loop(), self.pool, fn, *args)

    async def close(self, wait: bool = False) -> None:
        """The app's shutdown: no refresh task outlives it, and the pool takes no more work
        (`wait`: also until a call still running in it — which may hold a Redis connection —
        has returned)."""
        await self.refresher.close()
        if wait:
            await asyncio.to_thread(self.pool.shutdown, True)
        else:
            self.pool.shutdown(wait=False)

    async def redis(self, fn, *args, alone: bool = False):
        """A store call off the event loop — or, `alone` (a hit read), on it while its request
        is alone in the server (serving/hops.py); its failures counted and logged (as bursts)."""
        inline = False
        if alone:
            await self.hops.settle()
            inline = self.hops.alone()
            self.metrics.hit_reads.labels("event_loop" if inline else "pool").inc()
        try:
            result = fn(*args) if inline else await self.run(fn, *args)
        except STORE_ERRORS as e:
            self.hops.store_ok = False
            self.metrics.redis_errors.inc()
            self.redis_log.error(e)
            raise
        self.hops.store_ok = True
        self.redis_log.ok()
        return result

    async def reload(self) -> dict:
        """Load the bundle directory again and swap it in if its version changed. Requests in
        flight finish on the model they started with; cached states are keyed per version.
        BundleError (with the reason) when the directory holds no loadable bundle: the current
        model keeps serving."""
        async with self.reload_lock:
            current = self.runtime
            version = declared_version(self.settings.model)
            if version == current.bundle.version:
                return {"model_version": current.model_version, "reloaded": False}
            try:
                new = await self.run(self.load_runtime)
            except BundleError:
                raise
            except Exception as e:  # whatever a hostile or half-copied directory makes the loader raise
                raise BundleError(f"{self.settings.model}: {type(e).__name__}: {e}") from e
            try:
                self.same_layout(new)
                await self.redis(self.store.check_layout)  # and re-read the store's tables
            except LayoutError as e:
                raise BundleError(f"{self.settings.model}: {e}") from e
            except STORE_ERRORS:  # logged by `redis`; /readyz re-reads the tables when it answers
                pass
            self.runtime, previous = new, current.model_version
            del current  # no frame of this reload holds the old model while the settle below runs
            self.cache.local.clear()  # the old model's states: never a hit again
            self.settle_heap()  # the new model's objects frozen, the old one's collected
            self.metrics.model.clear()
            self.metrics.model.labels(new.model_version).set(1)
            log.info("reloaded %s: model_version %s → %s", self.settings.model, previous, new.model_version)
            return {"model_version": new.model_version, "previous": previous, "reloaded": True}


async def watch_bundle(svc: Service, every_s: float) -> None:
    """Reload every `every_s` seconds; a failure is logged with its reason and retried."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await svc.reload()
        except Exception as e:  # noqa: BLE001 -- a half-copied or bad bundle: keep serving, retry later
            log.warning("bundle watcher: reload failed, still serving the current model: %s", e)
