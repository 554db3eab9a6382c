"""Real HTTP for `longer bench serve`: a `longer serve` child process on loopback, and a lean
asyncio HTTP/1.1 client (prebuilt request bytes, keep-alive connections) whose own cost is a
small fraction of a request, so latency and throughput are the server's.

`Server(...)` starts the child and reads its port from the "listening on" line; leaving the
`with` block stops it (SIGTERM, then SIGKILL) whatever happened. `latencies` times sequential
requests on one connection; `throughput` runs C connections in parallel for a fixed number of
requests each.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

LISTENING = re.compile(r"listening on http://[^:]+:(\d+)")


class Server:
    """`longer serve --port 0` as a child process, for use in a `with` block."""

    def __init__(self, bundle: str, redis_url: str, prefix: str, threads: int, timeout_s: float = 120):
        self.cmd = [sys.executable, "-m", "longer_cli", "serve", "--bundle", bundle, "--port", "0"]
        self.cmd += ["--redis", redis_url, "--threads", str(threads)]
        self.env = {**os.environ, "LONGER_KEY_PREFIX": prefix, "LONGER_MAX_CANDIDATES": "1000"}
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, text=True)
        try:
            line = self.proc.stdout.readline()  # the server prints one line once it accepts connections
            match = LISTENING.search(line)
            if not match:
                raise RuntimeError(f"longer serve did not start: {line!r} (exit {self.proc.poll()})")
            self.port = int(match.group(1))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def request_bytes(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
    return (head + f"content-length: {len(body)}\r\n\r\n").encode() + body


class Connection:
    """One keep-alive connection: `call(request) -> (status, body)`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def call(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def check(status: int, body: bytes, outcome: str | None) -> None:
    if status != 200:
        raise RuntimeError(f"/v1/score answered {status}: {body[:300]!r}")
    if outcome is not None and json.loads(body)["user_state"] != outcome:
        raise RuntimeError(f"expected a {outcome}, got {body[:200]!r}")


async def accepted(port: int, request: bytes) -> bool:
    """Whether the server answers `request` with a 200."""
    conn = await Connection.open(port)
    try:
        return (await conn.call(request))[0] == 200
    finally:
        conn.close()


async def latencies(port: int, request: bytes, n: int, outcome: str, before=None) -> list[float]:
    """ms of `n` sequential requests on one connection, each checked to be a 200 with
    `user_state == outcome`; `before()` (if given) runs before each, outside the timing."""
    conn = await Connection.open(port)
    try:
        check(*await conn.call(request), None)  # warm-up (and the state cached, for hits)
        out = []
        for _ in range(n):
            if before is not None:
                before()
            t0 = time.perf_counter()
            status, body = await conn.call(request)
            out.append((time.perf_counter() - t0) * 1e3)
            check(status, body, outcome)
        return out
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of process `pid` (and its threads)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def throughput(
    port: int, request: bytes, clients: int, per_client: int, outcome: str, server_pid: int | None = None
) -> dict:
    """`clients` connections, each sending `per_client` requests back to back: requests/s over
    the wall time of the whole run, and the latency percentiles under that load; with
    `server_pid`, the server process's CPU time per request over the run
    (`server_cpu_ms_per_request`: what a request costs the server, whatever the wall time)."""
    conns = [await Connection.open(port) for _ in range(clients)]
    times: list[float] = []

    async def run(conn: Connection, n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            status, body = await conn.call(request)
            times.append((time.perf_counter() - t0) * 1e3)
            check(status, body, outcome)

    try:
        await asyncio.gather(*(run(c, 1) for c in conns))  # warm-up: one request each
        t0 = time.perf_counter()
        times.clear()
        cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
        await asyncio.gather(*(run(c, per_client) for c in conns))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(server_pid) - cpu0 if server_pid else None
    finally:
        for c in conns:
            c.close()
    times.sort()
    return {
        "clients": clients,
        "requests": len(times),
        "requests_per_s": round(len(times) / wall, 2),
        "p50_ms": round(times[len(times) // 2], 2),
        "p99_ms": round(times[min(len(times) - 1, round(0.99 * (len(times) - 1)))], 2),
        **({"server_cpu_ms_per_request": round(cpu * 1e3 / len(times), 2)} if cpu is not None else {}),
    }
