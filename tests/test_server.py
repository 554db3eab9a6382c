"""serving/server.py's parts that need no model: the port check, TCP_NODELAY on accepted
connections, and the store description."""

import asyncio
import socket

import pytest

from serving.server import ListenError, describe_redis, listen_socket


def test_a_taken_port_or_an_unknown_host_is_a_listen_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            listen_socket("127.0.0.1", port)
    with pytest.raises(ListenError, match="--host 'no-such-host.invalid'"):
        listen_socket("no-such-host.invalid", 0)
    sock = listen_socket("127.0.0.1", 0)  # port 0: the system picks a free one
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_connections_accepted_on_the_listen_socket_have_nagle_off():
    """Without TCP_NODELAY, a response written in two parts waits for the client's delayed ACK:
    ~40 ms added to every request over a real socket."""

    async def accepted_nodelay() -> int:
        sock = listen_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer):
            s = writer.get_extra_info("socket")
            seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)  # as uvicorn serves it
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, 10)
            writer.close()
            return value
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(accepted_nodelay()) != 0


def test_the_store_description_names_the_embedded_file_and_hides_passwords(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGER_REDIS_DIR", str(tmp_path))
    assert describe_redis("") == f"embedded, data in {tmp_path / 'store.rdb'}"
    shown = describe_redis("redis://app:s3cret@cache.internal:6380/2")
    assert "s3cret" not in shown and shown == "redis://app:***@cache.internal:6380/2"
    assert describe_redis("redis+cluster://node-1:7000") == "redis+cluster://node-1:7000"
