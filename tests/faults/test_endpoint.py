"""The endpoint under hostile clients, over real HTTP to a `serve deploy`ed application.

The application runs with conf/serve.yaml's own limits and timeouts (one small replica, a token),
so these tests check the values users get, not values picked to make a test pass.
"""

import asyncio
import io
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from PIL import Image

from tests.images import jpeg
from tests.services import ROOT, free_port
from tests.test_serve import deploy, wait_ready

pytestmark = pytest.mark.slow
TOKEN = "fault-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = yaml.safe_load((ROOT / "conf" / "serve.yaml").read_text())
ARGS = CONFIG["applications"][0]["args"]
DEPLOYMENT = CONFIG["applications"][0]["deployments"][0]


@pytest.fixture(scope="module")
def endpoint(ray_cluster, tmp_path_factory):
    """The application of conf/serve.yaml with a token, on one replica, on a free port."""
    port = free_port()
    config = yaml.safe_load((ROOT / "conf" / "serve.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"].update(auth_token=TOKEN, precision="fp32")
    app["deployments"][0].update(autoscaling_config={"min_replicas": 1, "max_replicas": 1},
                                 ray_actor_options={"num_cpus": 0.5})
    deploy(ray_cluster, config, tmp_path_factory.mktemp("endpoint") / "serve.yaml")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url
    finally:
        ray_cluster.shut_down_serve()


def flat_png(width: int, height: int) -> bytes:
    """One colour compresses to almost nothing however many pixels it claims."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 130, 140)).save(buffer, "PNG")
    return buffer.getvalue()


def test_stats_and_models_need_the_token_and_health_stays_open_for_probes(endpoint):
    for path in ("/stats", "/models"):
        refused = httpx.get(endpoint + path)
        assert refused.status_code == 401, path
        assert refused.json()["detail"] == "missing or wrong bearer token"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(endpoint + path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(endpoint + path, headers=AUTH).status_code == 200, path
    assert set(httpx.get(endpoint + "/stats", headers=AUTH).json()) == {"loaded_models", "recent_batch_sizes"}
    health = httpx.get(endpoint + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_image_over_the_pixel_cap_is_refused_from_its_header(endpoint):
    """13,000 x 13,000 (169 MP) is under Pillow's bomb guard and half a megabyte as a PNG: only
    the endpoint's own cap stands between it and a decode of its full size, eight at a time."""
    assert ARGS["max_pixels"] == 4096 * 4096
    huge = flat_png(13_000, 13_000)
    assert len(huge) < ARGS["max_upload_bytes"]

    async def eight() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(
                client.post(endpoint + "/predict", files={"file": ("huge.png", huge, "image/png")}, headers=AUTH)
                for _ in range(8)))

    for response in asyncio.run(eight()):
        assert response.status_code == 413, response.text
        assert response.json()["detail"] == f"too many pixels: 169000000 (at most {ARGS['max_pixels']})"
    batch = httpx.post(endpoint + "/predict/batch", headers=AUTH, timeout=60, files=[
        ("files", ("huge.png", huge, "image/png")), ("files", ("face.jpg", jpeg(seed=4), "image/jpeg"))])
    assert batch.status_code == 200, batch.text
    huge_result, face_result = batch.json()["results"]
    assert huge_result["status"] == "error" and huge_result["error"].startswith("too many pixels: 169000000")
    assert face_result["status"] == "ok"
    at_the_cap = httpx.post(endpoint + "/predict", headers=AUTH, timeout=60,
                            files={"file": ("cap.png", flat_png(4096, 4096), "image/png")})
    assert at_the_cap.status_code == 200, at_the_cap.text
    assert (at_the_cap.json()["width"], at_the_cap.json()["height"]) == (4096, 4096)
    health = httpx.get(endpoint + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


@dataclass
class Flood:
    """Clients that send a request's headers, then its body one byte a second, reconnecting as
    soon as they are answered or dropped, so that the flood keeps its size for its whole length."""

    url: str
    clients: int
    running: bool = True
    statuses: list[int] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    dropped: int = 0
    attempts: int = 0

    async def client(self) -> None:
        parts = urlsplit(self.url)
        head = (f"POST /predict HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n").encode()
        while self.running:
            self.attempts += 1
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            try:
                writer.write(head)
                await writer.drain()
                answer = asyncio.ensure_future(read_response(reader))
                while self.running and not answer.done():
                    writer.write(b"\xff")
                    await writer.drain()
                    await asyncio.wait([answer], timeout=1)
                if answer.done():
                    status, detail = answer.result()
                    self.statuses.append(status)
                    self.details.append(detail)
                else:
                    answer.cancel()
            except (ConnectionError, asyncio.IncompleteReadError):
                self.dropped += 1
            finally:
                writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Status and body of one HTTP/1.1 response with a Content-Length."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status_line, *header_lines = head.strip().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), body.decode(errors="replace")


def test_slow_uploads_cannot_starve_legitimate_requests(endpoint):
    """More trickling clients than the replica has slots (max_ongoing_requests) for the whole run:
    without a limit on slow bodies, each would hold its slot and no one else would be answered."""
    clients = 240
    assert clients > DEPLOYMENT["max_ongoing_requests"]
    flood = Flood(endpoint, clients)

    async def run() -> list[httpx.Response]:
        tasks = [asyncio.create_task(flood.client()) for _ in range(clients)]
        await asyncio.sleep(3)
        legitimate = []
        async with httpx.AsyncClient(timeout=CONFIG["http_options"]["request_timeout_s"] + 30) as client:
            for seed in range(3):
                legitimate.append(await client.post(
                    endpoint + "/predict", files={"file": ("f.jpg", jpeg(seed=seed), "image/jpeg")}, headers=AUTH))
        still_flooding = sum(not task.done() for task in tasks)
        flood.running = False
        await asyncio.wait(tasks, timeout=30)
        assert still_flooding == clients, "the flood ended before the legitimate requests were answered"
        return legitimate

    legitimate = asyncio.run(run())
    assert [r.status_code for r in legitimate] == [200, 200, 200], [r.text for r in legitimate]
    # Trickling clients were answered 408 with the reason, at least once each on average, and
    # none was served or turned away for want of room.
    assert len(flood.statuses) >= clients, (len(flood.statuses), flood.dropped, flood.attempts)
    assert set(flood.statuses) == {408}, sorted(set(flood.statuses))
    rate = ARGS["min_upload_bytes_per_s"]
    assert all(f"upload slower than {rate:g} bytes/s" in d for d in flood.details), flood.details[:3]
    health = httpx.get(endpoint + "/health")
    assert health.status_code == 200
