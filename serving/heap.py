"""The serving process's long-lived heap, kept out of CPython's full garbage collections.

A loaded server holds ~390,000 GC-tracked objects that live as long as the process (torch,
TorchRec, FastAPI, the model). CPython's oldest-generation collection walks every one of them
with the GIL held: 160–190 ms in which no thread runs, and under 8 concurrent clients of
/v1/score (L 2,000, 500 candidates) it came every ~0.6 s — every request in flight stalled
~200 ms (p99 270 ms against a p50 of 45), and the 8 clients got no more requests/s than one.

`settle()` collects once and moves what survives into the permanent generation (`gc.freeze`),
so later full collections walk only what was allocated since: 1–2.5 ms at the same load. The
app calls it when it starts and after a hot reload; the reload first thaws the heap
(`gc.unfreeze`) so the old model's reference cycles are collected, not kept for good.
Requests' own objects are collected as before. The collection itself holds the GIL for
~0.2 s: at start before the first request, and once per reload, when requests in flight wait
for it as they did for every full collection before.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("longer.serving")


def settle() -> int:
    """Thaw, collect and freeze the heap (module docstring); the objects now frozen."""
    t0 = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("heap settled: %d objects frozen in %.0f ms", frozen, (time.perf_counter() - t0) * 1e3)
    return frozen
