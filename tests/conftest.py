"""Shared fixtures, and the suite's hygiene rules (`isolated_session`):

* every test runs with its own embedded Redis directory (LONGER_REDIS_DIR under the session's
  temp space) and without REDIS_URL, so nothing reaches the user's default store;
* temp files (tempfile, TMPDIR for subprocesses) live under the session's temp space;
* tests that use the shared Redis (127.0.0.1:6379 db 15) take their key prefixes from
  `fresh_prefix()` (tests/serving_utils.py's `prefixed_store` does) and delete their keys; the
  session fails if any key under its prefixes is left;
* the session fails if a process it started — a redis-server, `longer serve`/uvicorn, a
  trainer — is still running when it ends (found by the session's environment marker, as
  descendants of this process, or by a command line or working directory under its temp space,
  which is what identifies a daemonized redis-server).

Apps do not settle the heap at start (LONGER_FREEZE_HEAP=false, serving/heap.py): a full
collection of the suite's own heap at every app start made the serving tests half as slow
again; tests/test_heap.py turns it on.

OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, set before torch loads), as the `longer`
CLI sets it: on a shared machine, spinning threads slow every test (trainer/threads.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before anything imports torch

import contextlib
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LONGER_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_REDIS_URL = "redis://127.0.0.1:6379/15"
SESSION_MARK = "LONGER_TEST_SESSION"  # environment variable every process of the session inherits
SESSION_ID = uuid.uuid4().hex[:12]


def suite_processes(session_id: str, temp_root: Path) -> list[psutil.Process]:
    """Running processes this test session started: they carry its environment marker, descend
    from this process, or run with a command line or working directory under `temp_root`
    (redis-server daemonizes — its parent is gone — and rewrites its environment block)."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    root = str(temp_root).rstrip(os.sep) + os.sep
    for p in psutil.process_iter():
        if p.pid == me.pid or p.pid in found:
            continue
        try:
            if (
                p.environ().get(SESSION_MARK) == session_id
                or root in " ".join(p.cmdline())
                or (p.cwd() + os.sep).startswith(root)
            ):
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    alive = []
    for p in found.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid}: {' '.join(p.cmdline())[:200]} (cwd {p.cwd()})"
    except psutil.Error:
        return f"pid {p.pid}"


def fresh_prefix() -> str:
    """A key prefix for the shared Redis, unique to one test and rooted in this session's id, so
    the session can verify at its end that every test deleted its keys."""
    return f"t{SESSION_ID}-{uuid.uuid4().hex[:8]}"


def _leftover_shared_keys() -> list[bytes]:
    """This session's keys still in the shared Redis (db 15), deleted; [] when none runs."""
    import redis

    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        left = list(client.scan_iter(match=f"t{SESSION_ID}-*", count=1000))
    except redis.ConnectionError:
        return []
    for i in range(0, len(left), 500):
        client.delete(*left[i : i + 500])
    return left


@pytest.fixture(scope="session", autouse=True)
def isolated_session(tmp_path_factory):
    temp_root = tmp_path_factory.getbasetemp()
    scratch = tmp_path_factory.mktemp("tmp", numbered=False)
    redis_dir = tmp_path_factory.mktemp("embedded-redis", numbered=False)
    mp = pytest.MonkeyPatch()
    mp.setenv(SESSION_MARK, SESSION_ID)
    mp.setenv("LONGER_REDIS_DIR", str(redis_dir))
    mp.delenv("REDIS_URL", raising=False)
    mp.setenv("TMPDIR", str(scratch))
    mp.setenv("LONGER_FREEZE_HEAP", "false")  # the module docstring; tests/test_heap.py turns it on
    mp.setattr(tempfile, "tempdir", str(scratch))
    try:
        yield
    finally:
        mp.undo()
    deadline = time.monotonic() + 10  # a server that is shutting down gets a moment
    while (left := suite_processes(SESSION_ID, temp_root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = [_describe(p) for p in left]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    keys = _leftover_shared_keys()
    if left:
        pytest.fail(
            "processes started by the test session outlived it (now killed):\n  " + "\n  ".join(described),
            pytrace=False,
        )
    if keys:
        pytest.fail(
            f"{len(keys)} keys of this test session were left in the shared Redis (db 15), e.g. "
            f"{keys[:3]} (now deleted)",
            pytrace=False,
        )


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (set LONGER_SHARED_DATA to the folder holding {name}/)")
    return path


def write_log(path: Path, columns: dict, schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def random_log(
    rng: np.random.Generator, users: int = 20, rows: int = 2000, ts_range: int = 40, items: int = 15
) -> dict:
    """Small log with many same-second ties and duplicate events, rows in random order."""
    return {
        "user_id": rng.integers(0, users, rows).astype(np.int64),
        "item_id": rng.integers(0, items, rows).astype(np.int64),
        "ts": (1_600_000_000 + rng.integers(0, ts_range, rows)).astype(np.int64),
        "label": rng.integers(0, 2, rows).astype(np.int8),
        "category_id": rng.integers(0, 4, rows).astype(np.int64),
        "action": rng.integers(1, 4, rows).astype(np.int64),
    }


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """A small synthetic log built into a dataset with several buckets and row groups."""
    from feature_store.builder import BuildConfig, build
    from feature_store.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(SynthConfig(users=60, items=300, events_per_user=300, seed=7), root / "log", progress=False)
    build(
        root / "log", root / "data", BuildConfig(max_len=256, test_days=5, bucket_rows=5000), progress=False
    )
    return root / "data"
