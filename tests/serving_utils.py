"""Helpers for the service tests: a random-weight bundle (fast, no training), Redis access with
key cleanup, free loopback ports, a redis-server of the test's own and a real uvicorn server
in a thread — each stopped by the test that started it."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, fresh_prefix


def tiny_bundle(out: Path, seed: int = 0, max_len: int = 64, encoding: str = "recency") -> Path:
    """A serving bundle of configs/tiny.toml's model with random weights (`encoding`:
    "append_stable" for one whose cached states update incrementally)."""
    from longer.config import ModelConfig
    from longer.recmodel import build_model
    from trainer.config import RunConfig
    from trainer.export import write_bundle

    torch.manual_seed(seed)
    cfg = ModelConfig.from_toml(REPO / "configs" / "tiny.toml")
    if max_len != cfg.max_len or encoding != cfg.encoding:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "max_len": max_len, "encoding": encoding})
    write_bundle(out, build_model(cfg).state_dict(), RunConfig(model=cfg), {})
    return out


def shared_redis(url: str = "redis://127.0.0.1:6379/15"):
    import redis

    from feature_store.online import connect

    client = connect(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis at 127.0.0.1:6379 (CI starts one)")
    return client


def delete_prefix(client, prefix: str) -> None:
    """Delete every key under `prefix:` (SCAN, never KEYS)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])


@contextlib.contextmanager
def served_bundle(bundle: Path, data: Path):
    """(app, store): the app serving `bundle` (max 50 candidates, a bearer token) over a prefixed
    store of the shared Redis holding `data`'s sequences; its keys are deleted afterwards. The
    near-line refresh is off, so what an event does to the next request is deterministic
    (tests/test_refresh.py tests the refresh)."""
    from serving.app import create_app
    from serving.runtime import ModelRuntime
    from serving.settings import Settings

    with prefixed_store(shared_redis()) as store:
        store.load_sequences(data, progress=False)
        settings = Settings(model=str(bundle), max_candidates=50, token="s3cret", refresh=False)
        yield create_app(settings, runtime=ModelRuntime(str(bundle)), store=store), store


@contextlib.contextmanager
def prefixed_store(client, max_len: int = 1000, **kw):
    """An OnlineStore under a fresh prefix whose keys are deleted afterwards."""
    from feature_store.online import OnlineStore

    store = OnlineStore(client, max_len=max_len, prefix=fresh_prefix(), **kw)
    try:
        yield store
    finally:
        delete_prefix(client, store.prefix)


@contextlib.contextmanager
def user_store(user: int, t0: int, n: int, max_len: int = 64):
    """A `prefixed_store` on the shared Redis holding `n` events of `user`, a minute apart from
    `t0` (items 100.., categories 0-4)."""
    from feature_store.online import Event

    with prefixed_store(shared_redis(), max_len=max_len) as s:
        s.append([Event(user, 100 + i, t0 + 60 * i, category_id=i % 5) for i in range(n)])
        yield s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server binary not installed")
    return server


def start_redis_server(port: int, workdir: Path, *extra: str) -> subprocess.Popen:
    """A redis-server of the test's own on 127.0.0.1:port (no persistence), ready when returned."""
    import redis

    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            redis.Redis(port=port, socket_connect_timeout=0.2).ping()
            return proc
        except redis.RedisError:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}") from None
            time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"redis-server on port {port} did not start")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def uvicorn_server(app, **config):
    """A real uvicorn server for `app` on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.025)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
