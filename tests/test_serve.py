"""The Serve application: its batcher and health rule in-process, then the whole application over
real HTTP, deployed with `serve deploy` to a local Ray head (marked slow)."""

import asyncio
import copy
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import yaml

from emotion.checkpoint import save_checkpoint
from emotion.predictor import Predictor
from emotion.preprocess import decode_image
from serve.app import FAILED_BATCHES_BEFORE_UNHEALTHY, Emotion
from serve.batching import Batcher
from tests.conftest import tiny_checkpoint
from tests.images import decompression_bomb, jpeg
from tests.services import BIN, ROOT, free_port

TOKEN = "s3cret-token"
# One request's images: a single 48x48 face.
PIXELS = np.zeros((1, 48, 48, 1), dtype=np.uint8)


class FakeModel:
    """Answers each image with its batch's size, records every batch, and can hold a pass open."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.fail = fail
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        self.batches.append(len(pixels))
        self.started.set()
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("forward failed")
        return np.full((len(pixels), 7), float(len(pixels)), dtype=np.float32)


def run_counting_timers(coro):
    """Run `coro` on a fresh loop; return its result and how many timers the loop armed meanwhile
    (a batching window is a timer: `asyncio.sleep` and `wait_for` arm one through `call_at`)."""
    loop = asyncio.new_event_loop()
    armed = []
    call_at = loop.call_at

    def counting_call_at(when, callback, *args, context=None):
        armed.append(callback)
        return call_at(when, callback, *args, context=context)

    loop.call_at = counting_call_at
    try:
        return loop.run_until_complete(coro), len(armed)
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def test_a_lone_request_runs_at_once_in_a_batch_of_its_own():
    batcher, model = Batcher(max_batch_size=32), FakeModel()

    async def one_client() -> list[float]:
        return [float((await batcher.predict(model, PIXELS))[0, 0]) for _ in range(5)]

    answers, timers = run_counting_timers(one_client())
    assert model.batches == [1, 1, 1, 1, 1] and answers == [1.0] * 5
    assert timers == 0, "a lone request waited for company"
    assert list(batcher.batch_sizes) == [1, 1, 1, 1, 1]


def test_requests_arriving_during_a_pass_share_the_next_one_up_to_the_batch_size():
    batcher, model = Batcher(max_batch_size=4), FakeModel()
    model.release.clear()

    async def burst() -> list[float]:
        first = asyncio.ensure_future(batcher.predict(model, PIXELS))
        await asyncio.to_thread(model.started.wait, 10)
        rest = [asyncio.ensure_future(batcher.predict(model, PIXELS)) for _ in range(6)]
        await asyncio.sleep(0)
        model.release.set()
        return [float(rows[0, 0]) for rows in await asyncio.gather(first, *rest)]

    answers, _ = run_counting_timers(burst())
    assert model.batches == [1, 4, 2]
    assert answers == [1.0, 4.0, 4.0, 4.0, 4.0, 2.0, 2.0]


def test_a_photos_faces_share_one_pass_and_are_never_split():
    """Requests of 3, 2, 5 and 1 faces arriving during a pass, batches of at most 4 images: the
    3 runs alone (3 + 2 > 4), the 2, then the 5 alone though larger than 4, then the 1."""
    batcher, model = Batcher(max_batch_size=4), FakeModel()
    model.release.clear()
    faces = [np.zeros((n, 48, 48, 1), dtype=np.uint8) for n in (3, 2, 5, 1)]

    async def burst() -> list[np.ndarray]:
        first = asyncio.ensure_future(batcher.predict(model, PIXELS))
        await asyncio.to_thread(model.started.wait, 10)
        rest = [asyncio.ensure_future(batcher.predict(model, pixels)) for pixels in faces]
        await asyncio.sleep(0)
        model.release.set()
        return await asyncio.gather(first, *rest)

    answers, _ = run_counting_timers(burst())
    assert model.batches == [1, 3, 2, 5, 1]
    assert [rows.shape for rows in answers] == [(1, 7), (3, 7), (2, 7), (5, 7), (1, 7)]
    assert [float(rows[0, 0]) for rows in answers] == [1.0, 3.0, 2.0, 5.0, 1.0]
    assert list(batcher.batch_sizes) == [1, 3, 2, 5, 1]


def test_each_model_gets_its_own_batches():
    batcher, alpha, beta = Batcher(max_batch_size=32), FakeModel(), FakeModel()
    alpha.release.clear()

    async def mixed() -> None:
        first = asyncio.ensure_future(batcher.predict(alpha, PIXELS))
        await asyncio.to_thread(alpha.started.wait, 10)
        rest = [asyncio.ensure_future(batcher.predict(model, PIXELS)) for model in [alpha, beta] * 3]
        await asyncio.to_thread(beta.started.wait, 10)
        alpha.release.set()
        await asyncio.gather(first, *rest)

    run_counting_timers(mixed())
    assert alpha.batches == [1, 3]
    assert beta.batches == [3]


def test_health_check_fails_after_consecutive_failed_forward_passes():
    batcher, broken, working = Batcher(max_batch_size=8), FakeModel(fail=True), FakeModel()
    replica = SimpleNamespace(batcher=batcher)

    async def passes(model: FakeModel, count: int) -> None:
        for _ in range(count):
            try:
                await batcher.predict(model, PIXELS)
            except RuntimeError as error:
                assert str(error) == "forward failed"

    run_counting_timers(passes(broken, FAILED_BATCHES_BEFORE_UNHEALTHY - 1))
    Emotion.func_or_class.check_health(replica)
    run_counting_timers(passes(working, 1))
    run_counting_timers(passes(broken, FAILED_BATCHES_BEFORE_UNHEALTHY - 1))
    Emotion.func_or_class.check_health(replica)
    run_counting_timers(passes(broken, 1))
    with pytest.raises(RuntimeError, match=f"the last {FAILED_BATCHES_BEFORE_UNHEALTHY} forward passes all raised"):
        Emotion.func_or_class.check_health(replica)


def deploy(cluster, config: dict, path) -> None:
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", cluster.dashboard_url],
                            env=cluster.env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def wait_ready(url: str, headers: dict | None = None, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", headers=headers, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("serve application did not become ready")


def serve_config(**args: object) -> dict:
    """conf/serve.yaml with `args` over its application's args, on a free loopback port, with one
    small replica (the tests share a 2-CPU head) batching up to 16 images."""
    config = yaml.safe_load((ROOT / "conf" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    app = config["applications"][0]
    app["args"].update(args)
    (deployment,) = app["deployments"]
    deployment.update(autoscaling_config={"min_replicas": 1, "max_replicas": 1},
                      ray_actor_options={"num_cpus": 0.25},
                      user_config={"max_batch_size": 16})
    return config


@contextmanager
def deployed(cluster, config: dict, folder: Path) -> Iterator[str]:
    """`config` deployed with `serve deploy` until the block ends; the service's base URL."""
    deploy(cluster, config, folder / "serve.yaml")
    try:
        url = f"http://127.0.0.1:{config['http_options']['port']}"
        wait_ready(url)
        yield url
    finally:
        cluster.shut_down_serve()


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    save_checkpoint(tiny_checkpoint(seed=1, name="alpha"), folder / "alpha.pt")
    save_checkpoint(tiny_checkpoint(seed=2, name="beta"), folder / "beta.pt")
    config = serve_config(models={"alpha": str(folder / "alpha.pt"), "beta": str(folder / "beta.pt")},
                          default_model="alpha", max_upload_bytes=1_000_000, auth_token=TOKEN,
                          cors_origins=["https://app.example"], precision="fp32")
    # A second application with a tiny queue, to observe backpressure.
    tight = copy.deepcopy(config["applications"][0])
    tight.update(name="tight", route_prefix="/tight")
    tight["args"].update(auth_token=None, models_per_replica=1)
    tight["deployments"][0].update(max_ongoing_requests=1, max_queued_requests=1,
                                   user_config={"max_batch_size": 1})
    config["applications"].append(tight)
    with deployed(ray_cluster, config, folder) as url:
        yield {"url": url, "alpha": folder / "alpha.pt", "beta": folder / "beta.pt"}


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.slow
def test_page_info_health_and_docs(service):
    info = httpx.get(service["url"] + "/info").json()
    assert info["service"] == "emotion-ray" and info["version"]
    assert httpx.get(service["url"] + "/", headers={"Accept": "application/json"}).json() == info
    for accept in ("text/html,application/xhtml+xml,*/*;q=0.8", "*/*"):
        page = httpx.get(service["url"] + "/", headers={"Accept": accept})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="file"' in page.text and 'id="token"' in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert "http://" not in page.text and "https://" not in page.text, "the page loads nothing from elsewhere"
    health = httpx.get(service["url"] + "/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    assert health["models"] == ["alpha", "beta"] and "alpha" in health["loaded_models"]
    spec = httpx.get(service["url"] + "/openapi.json").json()
    assert {"/predict", "/predict/batch", "/annotate", "/models", "/health", "/", "/info"} <= set(spec["paths"])
    assert httpx.get(service["url"] + "/docs").status_code == 200


@pytest.mark.slow
def test_predict_multipart_and_raw_body_agree_with_the_batch_predictor(service):
    image = jpeg(seed=7)
    multipart = httpx.post(service["url"] + "/predict", files={"file": ("face.jpg", image, "image/jpeg")},
                           headers=AUTH)
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert body["predicted_emotion"] == body["predicted_label"], "the earlier name stays for one release"
    assert set(body) >= {"predicted_label", "predicted_class", "confidence", "probabilities", "model",
                         "latency_ms"}
    assert body["model"] == "alpha"
    raw = httpx.post(service["url"] + "/predict", content=image,
                     headers=AUTH | {"Content-Type": "image/jpeg"}).json()
    assert raw["probabilities"] == body["probabilities"]
    expected = Predictor(service["alpha"], device="cpu", precision="fp32").predict_pixels(
        decode_image(image, 48, 1).pixels[None])[0]
    got = np.asarray([body["probabilities"][k] for k in Predictor(service["alpha"]).labels])
    assert np.allclose(got, expected, atol=1e-6)
    assert body["predicted_class"] == int(expected.argmax())
    assert body["confidence"] == pytest.approx(float(expected.max()))


@pytest.mark.slow
def test_model_choice_by_query_header_or_multiplexing_header_and_unknown_model(service):
    image = jpeg(seed=3)
    files = {"file": ("f.jpg", image, "image/jpeg")}
    alpha = httpx.post(service["url"] + "/predict", files=files, headers=AUTH).json()
    beta_q = httpx.post(service["url"] + "/predict?model=beta", files=files, headers=AUTH).json()
    beta_h = httpx.post(service["url"] + "/predict", files=files,
                        headers=AUTH | {"X-Emotion-Model": "beta"}).json()
    beta_m = httpx.post(service["url"] + "/predict", files=files,
                        headers=AUTH | {"serve_multiplexed_model_id": "beta"}).json()
    agreeing = httpx.post(service["url"] + "/predict?model=beta", files=files,
                          headers=AUTH | {"serve_multiplexed_model_id": "beta", "X-Emotion-Model": "beta"}).json()
    assert beta_q["model"] == beta_h["model"] == beta_m["model"] == agreeing["model"] == "beta"
    assert beta_q["probabilities"] == beta_h["probabilities"] == beta_m["probabilities"] != alpha["probabilities"]
    conflict = httpx.post(service["url"] + "/predict?model=alpha", files=files,
                          headers=AUTH | {"serve_multiplexed_model_id": "beta"})
    assert conflict.status_code == 400
    assert conflict.json()["detail"] == (
        "conflicting model choices: header serve_multiplexed_model_id 'beta', ?model 'alpha'")
    expected = Predictor(service["beta"], device="cpu", precision="fp32").predict_pixels(
        decode_image(image, 48, 1).pixels[None])[0]
    assert np.allclose(list(beta_q["probabilities"].values()), expected, atol=1e-6)
    missing = httpx.post(service["url"] + "/predict?model=gamma", files=files, headers=AUTH)
    assert missing.status_code == 404
    assert "unknown model 'gamma'; available: ['alpha', 'beta']" in missing.json()["detail"]
    listed = httpx.get(service["url"] + "/models", headers=AUTH).json()
    assert [m["name"] for m in listed["models"]] == ["alpha", "beta"]
    assert listed["models"][0]["labels"][3] == "happy"


@pytest.mark.slow
def test_batch_endpoint_reports_failures_per_item(service):
    files = [("files", ("a.jpg", jpeg(seed=1), "image/jpeg")), ("files", ("b.txt", b"hello", "text/plain")),
             ("files", ("c.jpg", jpeg(seed=2), "image/jpeg"))]
    response = httpx.post(service["url"] + "/predict/batch", files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["ok", "error", "ok"]
    assert [r["filename"] for r in results] == ["a.jpg", "b.txt", "c.jpg"]
    assert results[1]["error"] == "not an image"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "status", "detail"),
    [
        ({}, 422, "no image"),
        ({"files": {"other": ("x.jpg", b"x", "image/jpeg")}}, 422, "multipart field 'file'"),
        ({"files": {"file": ("x.jpg", b"just text", "image/jpeg")}}, 415, "not an image"),
        ({"files": {"file": ("x.jpg", jpeg(256)[:700], "image/jpeg")}}, 400, "truncated"),
        ({"files": {"file": ("bomb.png", decompression_bomb(), "image/png")}}, 413, "too many pixels"),
        ({"content": b"\xff" * 1_100_000, "headers": {"Content-Type": "image/jpeg"}}, 413, "upload larger than"),
    ],
)
@pytest.mark.slow
def test_bad_input_gets_a_4xx_with_a_reason_and_the_service_keeps_serving(service, kwargs, status, detail):
    headers = AUTH | kwargs.pop("headers", {})
    response = httpx.post(service["url"] + "/predict", headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    ok = httpx.post(service["url"] + "/predict", files={"file": ("f.jpg", jpeg(), "image/jpeg")}, headers=AUTH)
    assert ok.status_code == 200


@pytest.mark.slow
def test_chunked_upload_over_the_limit_is_cut_off(service):
    def chunks():
        for _ in range(100):
            yield b"\x00" * 20_000

    response = httpx.post(service["url"] + "/predict", content=chunks(),
                          headers=AUTH | {"Content-Type": "image/jpeg"})
    assert response.status_code == 413


@pytest.mark.slow
def test_auth_is_required_when_configured(service):
    files = {"file": ("f.jpg", jpeg(), "image/jpeg")}
    assert httpx.post(service["url"] + "/predict", files=files).status_code == 401
    wrong = httpx.post(service["url"] + "/predict", files=files, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(service["url"] + "/models").status_code == 401


@pytest.mark.slow
def test_cors_origin_from_config(service):
    preflight = httpx.options(service["url"] + "/predict", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert preflight.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.options(service["url"] + "/predict", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.slow
def test_concurrent_requests_share_forward_passes(service):
    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(
                client.post(service["url"] + "/predict", files={"file": ("f.jpg", jpeg(seed=i), "image/jpeg")},
                            headers=AUTH) for i in range(48)))
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 48
    stats = httpx.get(service["url"] + "/stats", headers=AUTH).json()
    assert max(stats["recent_batch_sizes"]) > 1


@pytest.mark.slow
def test_overload_is_503_with_retry_after_and_the_service_recovers(service):
    url = service["url"] + "/tight/predict"
    wait_ready(service["url"] + "/tight")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(
                client.post(url, files={"file": ("f.jpg", jpeg(size=480, seed=i), "image/jpeg")})
                for i in range(40)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert httpx.post(url, files={"file": ("f.jpg", jpeg(), "image/jpeg")}).status_code == 200


@pytest.mark.slow
def test_health_never_loads_or_evicts_a_model(service):
    """The tight app holds one model per replica: a probe that loaded the default would evict beta."""
    url = service["url"] + "/tight"
    wait_ready(url)
    files = {"file": ("f.jpg", jpeg(seed=6), "image/jpeg")}
    assert httpx.post(url + "/predict?model=beta", files=files).json()["model"] == "beta"
    for _ in range(3):
        health = httpx.get(url + "/health").json()
        assert health["loaded_models"] == ["beta"] and health["models"] == ["alpha", "beta"]
        assert health["device"] == "cpu" and health["precision"] == {"beta": "fp32"}
    assert httpx.get(url + "/stats").json()["loaded_models"] == ["beta"]


@pytest.mark.slow
def test_loaded_models_follow_eviction(service):
    """The tight app keeps one model per replica: loading beta evicts alpha, and /stats says so."""
    url = service["url"] + "/tight"
    wait_ready(url)
    files = {"file": ("f.jpg", jpeg(seed=5), "image/jpeg")}
    assert httpx.post(url + "/predict", files=files).json()["model"] == "alpha"
    assert httpx.get(url + "/stats").json()["loaded_models"] == ["alpha"]
    assert httpx.post(url + "/predict?model=beta", files=files).json()["model"] == "beta"
    assert httpx.get(url + "/stats").json()["loaded_models"] == ["beta"]
