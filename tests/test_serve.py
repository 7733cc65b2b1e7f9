"""The Serve application over real HTTP, deployed with `serve deploy` to a local Ray head."""

import asyncio
import copy
import subprocess

import httpx
import numpy as np
import pytest
import yaml

from emotion.checkpoint import save_checkpoint
from emotion.predictor import Predictor
from emotion.preprocess import decode_image
from tests.conftest import tiny_checkpoint
from tests.images import decompression_bomb, jpeg
from tests.services import BIN, ROOT, free_port

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


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


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    save_checkpoint(tiny_checkpoint(seed=1, name="alpha"), folder / "alpha.pt")
    save_checkpoint(tiny_checkpoint(seed=2, name="beta"), folder / "beta.pt")
    port = free_port()
    config = yaml.safe_load((ROOT / "conf" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"].update(models={"alpha": str(folder / "alpha.pt"), "beta": str(folder / "beta.pt")},
                       default_model="alpha", max_upload_bytes=1_000_000, auth_token=TOKEN,
                       cors_origins=["https://app.example"], precision="fp32")
    (deployment,) = app["deployments"]
    deployment.update(autoscaling_config={"min_replicas": 1, "max_replicas": 1},
                      ray_actor_options={"num_cpus": 0.25},
                      user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.05})
    # A second application with a tiny queue, to observe backpressure.
    tight = copy.deepcopy(app)
    tight.update(name="tight", route_prefix="/tight")
    tight["args"].update(auth_token=None, models_per_replica=1)
    tight["deployments"][0].update(max_ongoing_requests=1, max_queued_requests=1,
                                   user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
    config["applications"].append(tight)
    deploy(ray_cluster, config, folder / "serve.yaml")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    yield {"url": url, "alpha": folder / "alpha.pt", "beta": folder / "beta.pt"}
    subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", ray_cluster.dashboard_url],
                   env=ray_cluster.env(), capture_output=True, timeout=120)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_root_health_and_docs(service):
    root = httpx.get(service["url"] + "/").json()
    assert root["service"] == "emotion-ray" and root["version"]
    health = httpx.get(service["url"] + "/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    assert health["models"] == ["alpha", "beta"] and "alpha" in health["loaded_models"]
    spec = httpx.get(service["url"] + "/openapi.json").json()
    assert {"/predict", "/predict/batch", "/models", "/health", "/"} <= set(spec["paths"])
    assert httpx.get(service["url"] + "/docs").status_code == 200


def test_predict_multipart_and_raw_body_agree_with_the_batch_predictor(service):
    image = jpeg(seed=7)
    multipart = httpx.post(service["url"] + "/predict", files={"file": ("face.jpg", image, "image/jpeg")},
                           headers=AUTH)
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert set(body) >= {"predicted_emotion", "predicted_class", "confidence", "probabilities", "model",
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


def test_model_choice_by_query_or_header_and_unknown_model(service):
    image = jpeg(seed=3)
    files = {"file": ("f.jpg", image, "image/jpeg")}
    alpha = httpx.post(service["url"] + "/predict", files=files, headers=AUTH).json()
    beta_q = httpx.post(service["url"] + "/predict?model=beta", files=files, headers=AUTH).json()
    beta_h = httpx.post(service["url"] + "/predict", files=files,
                        headers=AUTH | {"X-Emotion-Model": "beta"}).json()
    assert beta_q["model"] == beta_h["model"] == "beta"
    assert beta_q["probabilities"] == beta_h["probabilities"] != alpha["probabilities"]
    expected = Predictor(service["beta"], device="cpu", precision="fp32").predict_pixels(
        decode_image(image, 48, 1).pixels[None])[0]
    assert np.allclose(list(beta_q["probabilities"].values()), expected, atol=1e-6)
    missing = httpx.post(service["url"] + "/predict?model=gamma", files=files, headers=AUTH)
    assert missing.status_code == 404
    assert "unknown model 'gamma'; available: ['alpha', 'beta']" in missing.json()["detail"]
    listed = httpx.get(service["url"] + "/models", headers=AUTH).json()
    assert [m["name"] for m in listed["models"]] == ["alpha", "beta"]
    assert listed["models"][0]["labels"][3] == "happy"


def test_batch_endpoint_reports_failures_per_item(service):
    files = [("files", ("a.jpg", jpeg(seed=1), "image/jpeg")), ("files", ("b.txt", b"hello", "text/plain")),
             ("files", ("c.jpg", jpeg(seed=2), "image/jpeg"))]
    response = httpx.post(service["url"] + "/predict/batch", files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["ok", "error", "ok"]
    assert [r["filename"] for r in results] == ["a.jpg", "b.txt", "c.jpg"]
    assert results[1]["error"] == "not an image"


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
def test_bad_input_gets_a_4xx_with_a_reason_and_the_service_keeps_serving(service, kwargs, status, detail):
    headers = AUTH | kwargs.pop("headers", {})
    response = httpx.post(service["url"] + "/predict", headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    ok = httpx.post(service["url"] + "/predict", files={"file": ("f.jpg", jpeg(), "image/jpeg")}, headers=AUTH)
    assert ok.status_code == 200


def test_chunked_upload_over_the_limit_is_cut_off(service):
    def chunks():
        for _ in range(100):
            yield b"\x00" * 20_000

    response = httpx.post(service["url"] + "/predict", content=chunks(),
                          headers=AUTH | {"Content-Type": "image/jpeg"})
    assert response.status_code == 413


def test_auth_is_required_when_configured(service):
    files = {"file": ("f.jpg", jpeg(), "image/jpeg")}
    assert httpx.post(service["url"] + "/predict", files=files).status_code == 401
    wrong = httpx.post(service["url"] + "/predict", files=files, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(service["url"] + "/models").status_code == 401


def test_cors_origin_from_config(service):
    preflight = httpx.options(service["url"] + "/predict", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert preflight.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.options(service["url"] + "/predict", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


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


def test_loaded_models_follow_eviction(service):
    """The tight app keeps one model per replica: loading beta evicts alpha, and /stats says so."""
    url = service["url"] + "/tight"
    wait_ready(url)
    files = {"file": ("f.jpg", jpeg(seed=5), "image/jpeg")}
    assert httpx.post(url + "/predict", files=files).json()["model"] == "alpha"
    assert httpx.get(url + "/stats").json()["loaded_models"] == ["alpha"]
    assert httpx.post(url + "/predict?model=beta", files=files).json()["model"] == "beta"
    assert httpx.get(url + "/stats").json()["loaded_models"] == ["beta"]
