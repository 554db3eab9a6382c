"""serving/server.py's parts that need no model: the port check and the store description."""

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


def test_the_store_description_names_the_embedded_file_and_hides_passwords(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGER_REDIS_DIR", str(tmp_path))
    assert describe_redis("") == f"embedded, data in {tmp_path / 'store.rdb'}"
    shown = describe_redis("redis://app:s3cret@cache.internal:6380/2")
    assert "s3cret" not in shown and shown == "redis://app:***@cache.internal:6380/2"
    assert describe_redis("redis+cluster://node-1:7000") == "redis+cluster://node-1:7000"
