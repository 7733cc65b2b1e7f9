"""UploadLimit against scripted ASGI clients: sizes and upload speeds, without a server."""

import asyncio
import json
import time

import pytest

from serve import limits
from serve.limits import UploadLimit


async def read_body(scope, receive, send) -> None:
    """An application that reads the whole body, then answers 200 with its length."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def call(middleware: UploadLimit, chunks: list[tuple[float, bytes]], headers=()) -> tuple[int, str]:
    """Send `chunks` as (delay before it, bytes) and return the status and body of the answer;
    the chunks never read are left in `chunks`."""

    async def run() -> tuple[int, str]:
        pending = chunks
        answer: list[dict] = []

        async def receive() -> dict:
            if not pending:
                await asyncio.sleep(3600)
            delay, data = pending.pop(0)
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": data, "more_body": bool(pending)}

        async def send(message: dict) -> None:
            answer.append(message)

        await middleware({"type": "http", "headers": list(headers)}, receive, send)
        return answer[0]["status"], answer[1]["body"].decode()

    return asyncio.run(run())


@pytest.fixture(autouse=True)
def short_grace(monkeypatch):
    monkeypatch.setattr(limits, "RATE_GRACE_S", 0.2)


def test_a_body_at_a_normal_pace_passes():
    middleware = UploadLimit(read_body, max_bytes=1000, timeout_s=1.0, min_rate=100)
    assert call(middleware, [(0.0, b"a" * 50), (0.05, b"b" * 50)]) == (200, "100")


def test_a_trickling_body_is_cut_off_after_the_grace():
    middleware = UploadLimit(read_body, max_bytes=1000, timeout_s=30.0, min_rate=100)
    status, body = call(middleware, [(0.1, b"a")] * 50)
    assert status == 408
    assert json.loads(body)["detail"].startswith("upload slower than 100 bytes/s (")


def test_a_body_fast_enough_but_not_complete_by_the_deadline_is_cut_off():
    middleware = UploadLimit(read_body, max_bytes=10_000, timeout_s=0.5, min_rate=100)
    status, body = call(middleware, [(0.1, b"a" * 100)] * 20)
    assert status == 408
    assert json.loads(body)["detail"].startswith("upload not complete within 0.5 s (")


def test_without_time_limits_a_slow_body_is_waited_for():
    middleware = UploadLimit(read_body, max_bytes=1000, timeout_s=None, min_rate=None)
    assert call(middleware, [(0.1, b"a")] * 5) == (200, "5")


def test_sizes_are_still_limited():
    middleware = UploadLimit(read_body, max_bytes=100, timeout_s=1.0, min_rate=100)
    assert call(middleware, [(0.0, b"a" * 60), (0.0, b"a" * 60)])[0] == 413
    declared = call(middleware, [(0.0, b"a")], headers=[(b"content-length", b"101")])
    assert declared == (413, json.dumps({"detail": "upload larger than 100 bytes"}))


def order_of(middleware: UploadLimit, chunks: list[tuple[float, bytes]], headers=()) -> list[str]:
    """What the middleware did, in order: "read" per chunk taken, then the status it answered."""
    events: list[str] = []

    async def run() -> None:
        async def receive() -> dict:
            if not chunks:
                await asyncio.sleep(3600)
            delay, data = chunks.pop(0)
            await asyncio.sleep(delay)
            events.append("read")
            return {"type": "http.request", "body": data, "more_body": bool(chunks)}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                events.append(str(message["status"]))

        await middleware({"type": "http", "headers": list(headers)}, receive, send)

    asyncio.run(run())
    return events


def test_a_refused_body_is_read_to_its_end_before_the_answer_unless_it_is_huge():
    middleware = UploadLimit(read_body, max_bytes=100, timeout_s=1.0, min_rate=100)
    declared = order_of(middleware, [(0.0, b"a" * 100)] * 3, headers=[(b"content-length", b"300")])
    assert declared == ["read", "read", "read", "413"], "read to the end first, so closing does not reset"
    assert order_of(middleware, [(0.0, b"a" * 60)] * 4) == ["read"] * 4 + ["413"]
    huge = order_of(middleware, [(0.0, b"a" * 100)] * 3, headers=[(b"content-length", str(10**9).encode())])
    assert huge == ["413"], "far beyond the limit: cut off, not read"
    endless = order_of(middleware, [(0.0, b"a" * 100)] * 10)
    assert endless == ["read"] * 5 + ["413"], "read until past four times the limit (400 bytes), then cut off"


def test_a_refused_body_is_drained_no_slower_than_an_upload_may_arrive():
    """A client sending a refused body at a trickle holds its slot no longer than the rate floor
    allows any upload."""
    middleware = UploadLimit(read_body, max_bytes=100, timeout_s=30.0, min_rate=100)
    started = time.monotonic()
    trickle = order_of(middleware, [(0.0, b"a" * 101)] + [(0.1, b"a")] * 200)
    assert trickle[-1] == "413" and len(trickle) < 20
    assert time.monotonic() - started < 2.0, "cut off after the grace, not after DRAIN_S"


def test_a_client_that_leaves_during_the_drain_is_not_waited_for():
    """Reading on after `http.disconnect` would wait out DRAIN_S for bytes that cannot come."""
    middleware = UploadLimit(read_body, max_bytes=100, timeout_s=30.0, min_rate=1)
    messages = [{"type": "http.request", "body": b"a" * 101, "more_body": True}, {"type": "http.disconnect"}]
    reads_after_leaving: list[dict] = []

    async def run() -> list[dict]:
        answer: list[dict] = []

        async def receive() -> dict:
            if not messages:
                reads_after_leaving.append({})
                await asyncio.sleep(3600)
            return messages.pop(0)

        async def send(message: dict) -> None:
            answer.append(message)

        await asyncio.wait_for(middleware({"type": "http", "headers": []}, receive, send), 2.0)
        return answer

    answer = asyncio.run(run())
    assert answer[0]["status"] == 413 and not reads_after_leaving
