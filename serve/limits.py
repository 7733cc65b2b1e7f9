"""An ASGI middleware that refuses uploads too large or too slow while they stream in.

Size: it checks Content-Length first and also counts the bytes of bodies sent without one
(chunked), so a 2 GB upload costs the replica at most `max_bytes` of memory before the 413.

Time: Serve gives a request one of the replica's `max_ongoing_requests` slots as soon as its
headers have arrived, before the application reads the body. A client that then sends its body
a byte at a time would hold that slot for as long as it likes, and a few hundred such clients
turn every legitimate request into a 503. So a body must arrive at `min_rate` bytes per second
on average (judged after a short grace) and be complete within `timeout_s`; otherwise the
request is answered 408 and its slot is freed. The rate floor is what frees slots quickly: a
trickling client is cut off after the grace rather than after the whole deadline.
"""

import asyncio
import json
from typing import Any

Scope = dict[str, Any]

# Time a connection gets for its first round trips before its upload rate is judged.
RATE_GRACE_S = 2.0

# An answer sent while the client is still sending is often lost: closing a connection with
# unread data makes the kernel reset it, and the reset can overtake the answer. So a refused
# body is read and thrown away first, while it stays within this many times the limit, within
# DRAIN_S, and within the same rate floor and deadline as any upload; beyond those it is cut off.
DRAIN_FACTOR = 4
DRAIN_S = 5.0


class UploadLimit:
    """Answers 413 beyond `max_bytes` of body, 408 for a body too slow or not complete in time.

    `timeout_s` or `min_rate` None switches that check off (Serve's `request_timeout_s` still
    bounds the whole request).
    """

    def __init__(self, app: Any, max_bytes: int, timeout_s: float | None, min_rate: float | None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.min_rate = min_rate

    async def _reject(self, send: Any, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, receive: Any, started: float, received: int) -> None:
        """Read and discard the rest of a refused body, so that its answer is not lost to a reset
        (see DRAIN_FACTOR); a refused client holds its slot no longer than an accepted one could."""
        loop = asyncio.get_running_loop()
        drain_until = loop.time() + DRAIN_S
        while received <= DRAIN_FACTOR * self.max_bytes:
            due = self._deadline(started, received)
            until = min(drain_until, due[0]) if due else drain_until
            try:
                message = await asyncio.wait_for(receive(), max(until - loop.time(), 0))
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _deadline(self, started: float, received: int) -> tuple[float, str] | None:
        """When the next part of the body is due, and what to tell a client that misses it."""
        due: list[tuple[float, str]] = []
        if self.timeout_s is not None:
            due.append((started + self.timeout_s, f"upload not complete within {self.timeout_s:g} s"))
        if self.min_rate is not None:
            due.append((started + RATE_GRACE_S + received / self.min_rate,
                        f"upload slower than {self.min_rate:g} bytes/s"))
        return min(due) if due else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        loop = asyncio.get_running_loop()
        started = loop.time()
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= DRAIN_FACTOR * self.max_bytes:
                await self._drain(receive, started, 0)
            await self._reject(send, 413, f"upload larger than {self.max_bytes} bytes")
            return
        received = 0
        body_complete = False
        responded = False

        async def guarded_receive() -> dict[str, Any]:
            nonlocal received, body_complete
            deadline = None if body_complete else self._deadline(started, received)
            if deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline[0] - loop.time(), 0))
                except TimeoutError:
                    raise _TooSlow(f"{deadline[1]} ({received} bytes received)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal responded
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _TooLarge:
            if not responded:
                if not body_complete:
                    await self._drain(receive, started, received)
                await self._reject(send, 413, f"upload larger than {self.max_bytes} bytes")
        except _TooSlow as slow:
            if not responded:
                await self._reject(send, 408, str(slow))


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass
