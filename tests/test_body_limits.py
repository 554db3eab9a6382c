"""Body limits and connection handling against a real uvicorn server on a loopback port.

Raw sockets, so the tests control the transfer encoding and the pace of every byte: a chunked
body is cut off at the size limit, a stalled body at the read timeout, 200 stalled clients do
not keep others waiting, and a 4xx keeps a keep-alive connection usable unless it says
`Connection: close`. Figures (time to 413, latencies) are printed, not asserted.
"""

import json
import select
import socket
import statistics
import time
from urllib.parse import urlparse

import httpx
import pytest

from serving.app import create_app
from serving.settings import Settings
from tests.serving_utils import prefixed_store, shared_redis, tiny_bundle, uvicorn_server

pytestmark = pytest.mark.slow

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bundle = tiny_bundle(tmp_path_factory.mktemp("limits") / "bundle")
    with prefixed_store(shared_redis(), max_len=64) as store:
        app = create_app(Settings(model=str(bundle), max_body_bytes=LIMIT, body_timeout_s=2.0), store=store)
        with uvicorn_server(app, timeout_keep_alive=30, backlog=1024) as url:
            yield urlparse(url).port, app


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response ({data[:80]!r})")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def request(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_chunked_body_gets_413_at_the_limit_without_reading_the_rest(server):
    port, _app = server
    sock = connect(port)
    sock.sendall(
        b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, total, t0 = 0, 60 << 20, time.perf_counter()
    while sent < total:
        if select.select([sock], [], [], 0)[0]:  # the server answered: stop sending
            break
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    status, headers, body = read_response(sock)
    elapsed = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "chunked_body_mb": 60,
                "sent_before_413_mb": round(sent / 2**20, 2),
                "seconds_to_413": round(elapsed, 3),
            }
        )
    )
    assert status == 413 and headers.get("connection") == "close"
    assert "larger than 1048576 bytes" in json.loads(body)["detail"]
    assert sent < total / 4  # answered near the limit, not after reading 60 MB
    assert closed_by_peer(sock)
    sock.close()


def test_declared_oversize_is_refused_before_reading(server):
    port, _ = server
    with connect(port) as sock:
        sock.sendall(
            b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 62914560\r\n\r\n"
        )
        status, headers, body = read_response(sock)
        assert status == 413 and headers["connection"] == "close" and b"Content-Length 62914560" in body


def test_stalled_body_gets_408_after_the_read_timeout(server):
    port, _app = server
    with connect(port) as sock:
        t0 = time.perf_counter()
        sock.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"user_id": 1'
        )
        status, headers, body = read_response(sock)
        waited = time.perf_counter() - t0
        assert status == 408 and headers["connection"] == "close" and b"not received within 2 s" in body
        assert waited >= 1.9  # not before the timeout
        assert closed_by_peer(sock)
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'longer_requests_rejected_total{reason="timeout"}' in metrics


def test_200_stalled_connections_do_not_hold_up_other_clients(server):
    port, _ = server
    body = json.dumps({"user_id": 7, "candidates": [{"item_id": 1}], "ts": 1_700_000_000}).encode()

    def latencies(n=20):
        out = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.post("/v1/score", content=body, headers={"content-type": "application/json"})
                out.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
        return out

    before = latencies()
    stalled = []
    for _ in range(200):
        s = connect(port)
        s.sendall(request("/v1/score", body)[:-10])  # all but the last 10 bytes of the body
        stalled.append(s)
    during = latencies()
    answers = []
    for s in stalled:
        answers.append(read_response(s)[0])
        s.close()
    print(
        json.dumps(
            {
                "stalled": 200,
                "p50_ms_before": round(1e3 * statistics.median(before), 2),
                "p50_ms_during": round(1e3 * statistics.median(during), 2),
                "max_ms_during": round(1e3 * max(during), 2),
            }
        )
    )
    assert answers == [408] * 200


def test_a_4xx_keeps_the_connection_usable(server):
    port, _ = server
    good = json.dumps({"user_id": 3, "candidates": [{"item_id": 1}], "ts": 1_700_000_000}).encode()
    with connect(port) as sock:
        for bad in (
            b'{"user_id": NaN, "candidates": [{"item_id": 1}]}',
            b'{"user_id": 1, "candidates": [{"item_id": 1}], "ts": "\\ud800"}',
            b'{"user_id": 1, "candidates": [{"item_id": 1}], "ts": 1790000000000}',
            b'{"user_id": 1, "candidates": [{"item_id": 1e400}]}',
            b"{not json",
            b"\xff\xfe",
        ):
            sock.sendall(request("/v1/score", bad))
            status, headers, body = read_response(sock)
            assert status in (400, 422) and "connection" not in headers, (bad, status, headers)
            sock.sendall(request("/v1/score", good))  # the same connection still works
            status, _, body = read_response(sock)
            assert status == 200, body


def test_a_server_bug_answers_500_and_says_it_closes(server, monkeypatch):
    port, app = server

    def boom(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.service.runtime, "score", boom)
    with connect(port) as sock:
        sock.sendall(
            request("/v1/score", b'{"user_id": 5, "candidates": [{"item_id": 1}], "ts": 1700000000}')
        )
        status, headers, body = read_response(sock)
        assert status == 500 and headers.get("connection") == "close" and b"RuntimeError" in body
        assert closed_by_peer(sock)
