"""Request body limits that hold for every transfer encoding (a pure ASGI middleware).

`BodyLimits` reads the whole request body before the app sees it, counting the bytes of every
`http.request` message — so a `Transfer-Encoding: chunked` body is bounded exactly like one
with a Content-Length — and answers

    413  as soon as the body passes `max_bytes` (a declared Content-Length above it is refused
         before a byte is read), without reading the rest;
    408  when the body is not complete `timeout_s` after the request arrived (a stalled or
         trickling client);

both with `Connection: close`, since the unread rest of the body makes the connection unusable.
Waiting for a slow body costs one suspended coroutine, not a worker, so stalled clients do not
slow the others. The app then receives the body as one message. (Starlette's own
RequestBodyLimitMiddleware bounds size only, and answers without closing the connection.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _Reject(Exception):
    def __init__(self, status: int, reason: str, detail: str):
        self.status, self.reason, self.detail = status, reason, detail


async def reject(send: Send, status: int, detail: str) -> None:
    """A JSON error response that closes the connection."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyLimits:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float,
        on_reject: Callable[[str], None] = lambda reason: None,
    ):
        self.app, self.max_bytes, self.timeout_s, self.on_reject = app, max_bytes, timeout_s, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            body = await self.read_body(scope, receive)
        except _Reject as r:
            self.on_reject(r.reason)
            return await reject(send, r.status, r.detail)
        if body is None:  # the client went away
            return None
        return await self.app(scope, replay(body, receive), send)

    async def read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        declared = declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            raise self.too_large(f"Content-Length {declared}")
        deadline = time.monotonic() + self.timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _Reject(
                    408,
                    "timeout",
                    f"request body not received within {self.timeout_s:g} s ({size} bytes arrived)",
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self.too_large(f"more than {self.max_bytes} bytes received")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def too_large(self, what: str) -> _Reject:
        return _Reject(
            413,
            "too_large",
            f"request body larger than {self.max_bytes} bytes ({what}; LONGER_MAX_BODY_BYTES)",
        )


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that yields `body` once, then defers to the server (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
