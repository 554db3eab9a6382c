"""feature_store/pending.py: a script's request sent now and its reply read later — the same
reply and errors as calling the script, the connection always back in the pool, and redis-py's
own path wherever the split cannot hold."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from redis.connection import Connection

from feature_store.online import Event, OnlineStore
from feature_store.pending import send_script
from tests.conftest import fresh_prefix
from tests.serving_utils import delete_prefix, shared_redis

COUNT = "redis.call('INCR', KEYS[1]); return {redis.call('GET', KEYS[1]), ARGV[1]}"
REFUSE = "return redis.error_reply('BADKEY ' .. KEYS[1] .. ' is not a list')"


@pytest.fixture
def client():
    r = shared_redis()
    prefix = fresh_prefix()
    yield r, prefix
    delete_prefix(r, prefix)
    r.connection_pool.disconnect()


def in_use(r) -> int:
    return len(r.connection_pool._in_use_connections)


def loaded(r, text: str):
    """The script, loaded on the server (a first call loads it)."""
    script = r.register_script(text)
    r.script_load(text)
    return script


def test_the_request_runs_before_its_reply_is_read(client):
    r, prefix = client
    key = f"{prefix}:n"
    reply = send_script(r, loaded(r, COUNT), [key], [b"x"])
    other = redis.Redis(connection_pool=redis.ConnectionPool.from_url("redis://127.0.0.1:6379/15"))
    deadline = time.monotonic() + 5
    while other.get(key) is None and time.monotonic() < deadline:  # Redis ran it: nothing read yet
        time.sleep(0.001)
    assert other.get(key) == b"1" and in_use(r) == 1
    assert reply() == [b"1", b"x"] and in_use(r) == 0
    assert loaded(r, COUNT)(keys=[key], args=[b"y"]) == [b"2", b"y"]  # the connection is reusable
    other.connection_pool.disconnect()


def test_an_error_reply_is_raised_as_the_script_raises_it(client):
    r, prefix = client
    script = loaded(r, REFUSE)
    with pytest.raises(redis.ResponseError) as direct:
        script(keys=[f"{prefix}:k"], args=[])
    reply = send_script(r, script, [f"{prefix}:k"], [])
    with pytest.raises(redis.ResponseError) as split:
        reply()
    assert str(split.value) == str(direct.value) and in_use(r) == 0
    assert r.ping()


def test_a_script_the_server_does_not_hold_is_loaded_and_run(client):
    r, prefix = client
    text = f"-- {uuid.uuid4().hex}\nreturn ARGV[1]"  # never loaded on this server
    reply = send_script(r, r.register_script(text), [f"{prefix}:k"], [b"v"])
    assert reply() == b"v" and in_use(r) == 0


def test_a_connection_lost_while_reading_is_read_again_on_a_fresh_one(client, monkeypatch):
    r, prefix = client
    script = loaded(r, COUNT)
    reply = send_script(r, script, [f"{prefix}:n"], [b"x"])
    read = Connection.read_response
    calls = []

    def lost_once(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 1:
            raise redis.ConnectionError("connection reset by peer")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "read_response", lost_once)
    assert reply() == [b"2", b"x"]  # run twice: sent again (a read-only script is what the split is for)
    assert in_use(r) == 0 and calls  # the lost read was one of them


def test_a_request_that_cannot_be_sent_goes_through_redis_py(client, monkeypatch):
    r, prefix = client
    script = loaded(r, COUNT)

    def broken(self, *args, **kwargs):
        raise redis.ConnectionError("broken pipe")

    with monkeypatch.context() as m:
        m.setattr(Connection, "send_command", broken)
        reply = send_script(r, script, [f"{prefix}:n"], [b"x"])
    assert in_use(r) == 0
    assert reply() == [b"1", b"x"]


def test_other_clients_call_the_script_when_the_reply_is_asked_for():
    called = []
    reply = send_script(object(), lambda keys, args: called.append((keys, args)) or "r", ["k"], ["a"])
    assert called == []
    assert reply() == "r" and called == [(["k"], ["a"])]


def test_read_head_later_reads_what_read_head_reads(client):
    r, prefix = client
    store = OnlineStore(r, max_len=4, prefix=prefix)
    store.append([Event(3, 10, 100, 1, 1, 0), Event(3, 11, 101, 1, 1, 0)])
    store.r.set(store._key(3, "st:m"), b"state-bytes")
    assert store.read_head_later(3, "m")() == store.read_head(3, "m") == (2, 1, b"state-bytes", 2)
    assert store.read_head_later(3, "m", b"bytes")()[2] == b"bytes"  # held: the value not sent
    assert in_use(r) == 0
