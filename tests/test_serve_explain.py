"""`POST /explain` and the onnxruntime backend over real HTTP against Ray Serve (marked slow): the
/predict answer with each face's Grad-CAM overlay, the class asked with `?target=`, the overlay
alone with `Accept: image/png`, the same token and limits as /predict; deployments running the
embedded model in ONNX Runtime and in int8. A backend with a precision it cannot run, and int8 for
a model without its int8 graph, are refused in-process."""

import base64
import copy
import io

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from emotion.explain import Explainer, overlay
from emotion.faces import FaceFinder, load_face_config
from emotion.labels import LABELS
from emotion.predictor import Predictor
from serve.app import DEFAULT_FACE_CONFIG, OVERLAY_SIDE, build_app
from tests.images import decompression_bomb
from tests.services import ROOT
from tests.test_faces import three_faces
from tests.test_serve import TOKEN, deployed, serve_config, wait_ready
from tests.test_serve_faces import FACE_48, png

AUTH = {"Authorization": f"Bearer {TOKEN}"}
UPLOAD_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """The embedded model behind a token in float32 at `/`, the same in ONNX Runtime at `/onnx`, and
    its int8 graph at `/int8`."""
    folder = tmp_path_factory.mktemp("serve-explain")
    config = serve_config(auth_token=TOKEN, precision="fp32", max_upload_bytes=UPLOAD_LIMIT)
    onnx = copy.deepcopy(config["applications"][0])
    onnx.update(name="onnx", route_prefix="/onnx")
    onnx["args"].update(backend="onnxruntime", precision="fp32")
    int8 = copy.deepcopy(config["applications"][0])
    int8.update(name="int8", route_prefix="/int8")
    int8["args"].update(precision="int8")
    config["applications"] += [onnx, int8]
    with deployed(ray_cluster, config, folder) as url:
        wait_ready(url + "/onnx")
        wait_ready(url + "/int8")
        yield url


class Expected:
    """The library's own answer, without Serve: the crops FaceFinder cuts, the embedded model's
    float32 classes and the overlay PNG's pixels for a class."""

    def __init__(self) -> None:
        self.predictor = Predictor(None, device="cpu", precision="fp32")
        checkpoint = self.predictor.checkpoint
        self.finder = FaceFinder(load_face_config(DEFAULT_FACE_CONFIG), checkpoint.input_size, checkpoint.channels)
        self.explainer = Explainer(checkpoint)

    def crops(self, data: bytes, mode: str) -> np.ndarray:
        return np.stack([crop.pixels for crop in self.finder.find(data, mode).crops])

    def overlays(self, data: bytes, mode: str, classes: list[int] | None = None) -> list[np.ndarray]:
        pixels = self.crops(data, mode)
        if classes is None:
            classes = self.predictor.predict_pixels(pixels).argmax(axis=1).tolist()
        return [np.asarray(overlay(face, e.heatmap, OVERLAY_SIDE))
                for face, e in zip(pixels, self.explainer.explain(pixels, classes), strict=True)]


@pytest.fixture(scope="module")
def expected() -> Expected:
    return Expected()


def post(url: str, data: bytes, path: str = "/explain", query: str = "", **headers: str) -> httpx.Response:
    return httpx.post(f"{url}{path}{query}", files={"file": ("photo.png", data, "image/png")},
                      headers=AUTH | headers, timeout=180)


def heatmap(face: dict) -> np.ndarray:
    """A face's overlay as decoded pixels."""
    image = Image.open(io.BytesIO(base64.b64decode(face["explanation"]["heatmap_png"])))
    assert image.format == "PNG"
    return np.asarray(image)


def close(served: np.ndarray, computed: np.ndarray) -> bool:
    """The same overlay but for rounding: a heatmap computed in another batch or order of threads
    may cross a level of the 8-bit heat here and there, which the colour map widens a little."""
    if served.shape != computed.shape:
        return False
    difference = np.abs(served.astype(int) - computed.astype(int))
    return int(difference.max()) <= 8 and float(difference.mean()) < 0.5


@pytest.mark.slow
def test_explain_answers_as_predict_with_each_faces_overlay_on_a_48x48_face(service, expected):
    response = post(service, FACE_48, query="?faces=whole")
    assert response.status_code == 200, response.text
    body = response.json()
    predicted = post(service, FACE_48, path="/predict", query="?faces=whole").json()
    assert {k: v for k, v in body.items() if k not in ("faces", "latency_ms")} == \
        {k: v for k, v in predicted.items() if k not in ("faces", "latency_ms")}
    (face,) = body["faces"]
    explanation = face.pop("explanation")
    assert face == predicted["faces"][0]
    assert explanation["target_class"] == face["predicted_class"]
    assert explanation["target_label"] == face["predicted_label"]
    (computed,) = expected.overlays(FACE_48, "whole")
    served = heatmap({"explanation": explanation})
    assert served.shape == (OVERLAY_SIDE, OVERLAY_SIDE, 3)
    assert close(served, computed)


@pytest.mark.slow
def test_every_face_of_a_photo_is_explained_outside_the_batched_path(service, expected):
    photo = png(three_faces())
    before = httpx.get(service + "/stats", headers=AUTH).json()["recent_batch_sizes"]
    response = post(service, photo, query="?faces=detect")
    after = httpx.get(service + "/stats", headers=AUTH).json()["recent_batch_sizes"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and len(body["faces"]) == 3
    assert after == [*before, 3], "one forward pass in the batcher, for the prediction alone"
    for face, computed in zip(body["faces"], expected.overlays(photo, "detect"), strict=True):
        assert face["explanation"]["target_class"] == face["predicted_class"]
        assert close(heatmap(face), computed)
    assert {k: body[k] for k in ("predicted_label", "confidence")} == \
        {k: body["faces"][0][k] for k in ("predicted_label", "confidence")}


@pytest.mark.slow
def test_a_target_explains_that_class_instead_of_the_predicted_one(service, expected):
    photo = png(three_faces())
    default = post(service, photo, query="?faces=detect").json()["faces"]
    happy = post(service, photo, query="?faces=detect&target=happy").json()["faces"]
    assert [f["probabilities"] for f in happy] == [f["probabilities"] for f in default]
    assert {(f["explanation"]["target_label"], f["explanation"]["target_class"]) for f in happy} == \
        {("happy", LABELS.index("happy"))}
    others = [i for i, f in enumerate(default) if f["predicted_label"] != "happy"]
    assert others, "the photo has a face not predicted happy"
    for i in others:
        assert not close(heatmap(happy[i]), heatmap(default[i])), "another class, another heatmap"
    computed = expected.overlays(photo, "detect", [LABELS.index("happy")] * 3)
    assert all(close(heatmap(face), c) for face, c in zip(happy, computed, strict=True))


@pytest.mark.slow
def test_accept_png_answers_the_largest_faces_overlay(service):
    photo = png(three_faces())
    response = post(service, photo, query="?faces=detect&target=fear", Accept="image/png")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    as_json = post(service, photo, query="?faces=detect&target=fear").json()
    assert close(np.asarray(Image.open(io.BytesIO(response.content))), heatmap(as_json["faces"][0]))


@pytest.mark.slow
def test_no_face_is_no_face_in_json_and_404_for_a_png(service):
    flat = png(np.full((480, 640), 200, dtype=np.uint8))
    body = post(service, flat).json()
    assert body["status"] == "no_face" and body["faces"] == []
    refused = post(service, flat, Accept="image/png")
    assert refused.status_code == 404
    assert refused.json()["detail"] == "no face found to explain (faces=auto)"


@pytest.mark.slow
def test_explain_needs_the_token_and_keeps_the_limits(service):
    unauthorised = httpx.post(service + "/explain", files={"file": ("f.png", FACE_48, "image/png")})
    assert unauthorised.status_code == 401
    bomb = post(service, decompression_bomb(), query="?faces=detect")
    assert bomb.status_code == 413 and "too many pixels" in bomb.json()["detail"]
    large = httpx.post(service + "/explain", content=b"\xff" * (UPLOAD_LIMIT + 1),
                       headers=AUTH | {"Content-Type": "image/jpeg"}, timeout=60)
    assert large.status_code == 413 and "upload larger than" in large.json()["detail"]
    assert post(service, FACE_48, query="?model=nobody").status_code == 404
    assert "/explain" in httpx.get(service + "/openapi.json").json()["paths"]


@pytest.mark.slow
def test_an_unknown_target_is_refused_with_the_known_labels(service):
    response = post(service, FACE_48, query="?target=bored")
    assert response.status_code == 422
    assert response.json()["detail"] == f"unknown target 'bored'; known: {', '.join(LABELS)}"


@pytest.mark.slow
def test_the_onnxruntime_backend_answers_as_onnx_runtime_does_outside_serve(service, expected):
    photo = png(three_faces())
    response = post(service + "/onnx", photo, path="/predict", query="?faces=detect")
    assert response.status_code == 200, response.text
    onnx = Predictor(None, backend="onnxruntime", precision="fp32")
    probs = onnx.predict_pixels(expected.crops(photo, "detect"))
    faces = response.json()["faces"]
    assert len(faces) == len(probs) == 3
    for face, row in zip(faces, probs, strict=True):
        assert np.allclose([face["probabilities"][label] for label in onnx.labels], row, atol=1e-4)
    assert httpx.get(service + "/onnx/models", headers=AUTH).json()["backend"] == "onnxruntime"
    health = httpx.get(service + "/onnx/health").json()
    assert (health["backend"], set(health["precision"].values()), health["device"]) == ("onnxruntime", {"fp32"}, "cpu")
    assert httpx.get(service + "/models", headers=AUTH).json()["backend"] == "torch"


@pytest.mark.slow
def test_precision_int8_answers_as_the_int8_predictor_does_outside_serve(service, expected):
    photo = png(three_faces())
    response = post(service + "/int8", photo, path="/predict", query="?faces=detect")
    assert response.status_code == 200, response.text
    int8 = Predictor(None, precision="int8")
    probs = int8.predict_pixels(expected.crops(photo, "detect"))
    faces = response.json()["faces"]
    assert len(faces) == len(probs) == 3
    for face, row in zip(faces, probs, strict=True):
        assert np.allclose([face["probabilities"][label] for label in int8.labels], row, atol=1e-4)
    health = httpx.get(service + "/int8/health").json()
    assert (health["backend"], set(health["precision"].values()), health["device"]) == ("torch", {"int8"}, "cpu")


@pytest.mark.parametrize(("change", "message"), [
    ({"backend": "onnxruntime", "precision": "bf16"}, "backend onnxruntime runs float32 or int8 on the CPU"),
    ({"backend": "onnxruntime", "device": "cuda"}, "device must be null or cpu"),
    ({"precision": "int8", "device": "cuda"}, "precision int8 runs on the CPU only"),
    ({"precision": "half"}, "precision 'half' is not one of auto, bf16, fp32, int8"),
    ({"backend": "tensorrt"}, "backend 'tensorrt' is not one of torch, onnxruntime"),
])
def test_a_backend_with_a_precision_or_device_it_cannot_run_is_refused_at_startup(change, message):
    args = yaml.safe_load((ROOT / "conf" / "serve.yaml").read_text())["applications"][0]["args"]
    with pytest.raises(ValueError, match=message):
        build_app(args | change)


def test_int8_for_a_model_without_its_int8_graph_is_refused_at_startup(tiny_checkpoint_path):
    args = yaml.safe_load((ROOT / "conf" / "serve.yaml").read_text())["applications"][0]["args"]
    with pytest.raises(ValueError, match=r"precision int8: model 'tiny' .* carries no int8 graph"):
        build_app(args | {"precision": "int8", "models": {"tiny": str(tiny_checkpoint_path)}, "default_model": "tiny"})
