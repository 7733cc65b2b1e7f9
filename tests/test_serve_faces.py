"""Faces in photos through the endpoint, over real HTTP against Ray Serve (marked slow): the faces
list and its boxes, the top-level fields for the largest face, the three modes, photos with no
face or fifty, and the annotated PNG."""

import io

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from emotion.faces import FaceFinder, face_config
from emotion.predictor import Predictor
from tests.images import decompression_bomb
from tests.services import ROOT
from tests.test_faces import FACES, PLACED, SIDE, three_faces
from tests.test_serve import TOKEN, deployed, serve_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}
FACE_48 = (FACES / "happy" / "PublicTest_10130075.jpg").read_bytes()
RECORD = ("predicted_label", "predicted_emotion", "predicted_class", "confidence", "probabilities")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def fifty_faces() -> np.ndarray:
    """Fifty bundled faces, 100 px each, in a 10 x 5 grid with 10 px gaps (1110 x 560)."""
    names = list(PLACED)
    canvas = np.full((560, 1110), 128, dtype=np.uint8)
    for i in range(50):
        row, col = divmod(i, 10)
        face = Image.open(FACES / names[i % len(names)]).convert("L").resize((100, 100), Image.Resampling.BICUBIC)
        canvas[10 + row * 110 : 110 + row * 110, 10 + col * 110 : 110 + col * 110] = np.asarray(face)
    return canvas


@pytest.fixture(scope="module")
def faces_conf(tmp_path_factory):
    """conf/faces.yaml with no shrinking of large photos: the configured one shrinks to 640 px, where
    fifty faces in one photo are smaller than dlib's window. Also proves `face_config` is read."""
    values = yaml.safe_load((ROOT / "conf" / "faces.yaml").read_text())
    values["params"]["max_side"] = None
    path = tmp_path_factory.mktemp("faces") / "faces.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory, faces_conf):
    """The embedded model behind a token, faces as configured (auto), the face config above."""
    folder = tmp_path_factory.mktemp("serve-faces")
    config = serve_config(auth_token=TOKEN, precision="fp32", face_config=str(faces_conf))
    with deployed(ray_cluster, config, folder) as url:
        yield url


class Expected:
    """What the endpoint must answer, computed here with the library alone, without Serve: the
    faces FaceFinder finds and the embedded model's probabilities for their crops."""

    def __init__(self, faces_conf) -> None:
        self.predictor = Predictor(None, device="cpu", precision="fp32")
        self.labels = self.predictor.labels
        checkpoint = self.predictor.checkpoint
        self.finder = FaceFinder(face_config(yaml.safe_load(faces_conf.read_text())), checkpoint.input_size,
                                 checkpoint.channels)

    def __call__(self, data: bytes, mode: str) -> tuple[list, np.ndarray]:
        crops = self.finder.find(data, mode).crops
        return [crop.face for crop in crops], self.predictor.predict_pixels(np.stack([crop.pixels for crop in crops]))


@pytest.fixture(scope="module")
def expected(faces_conf) -> Expected:
    return Expected(faces_conf)


def post(url: str, data: bytes, path: str = "/predict", query: str = "", **headers: str) -> httpx.Response:
    return httpx.post(f"{url}{path}{query}", files={"file": ("photo.png", data, "image/png")},
                      headers=AUTH | headers, timeout=120)


@pytest.mark.slow
def test_faces_are_listed_largest_first_with_their_boxes_and_the_top_level_is_the_largest(service, expected):
    photo = png(three_faces())
    response = post(service, photo, query="?faces=detect")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and body["detected"] is True
    assert (body["width"], body["height"]) == (640, 480)
    faces = body["faces"]
    assert len(faces) == 3
    areas = [face["box"]["w"] * face["box"]["h"] for face in faces]
    assert areas == sorted(areas, reverse=True)
    centres = sorted((x + SIDE / 2, y + SIDE / 2) for x, y in PLACED.values())
    found = sorted((f["box"]["x"] + f["box"]["w"] / 2, f["box"]["y"] + f["box"]["h"] / 2) for f in faces)
    for (cx, cy), (fx, fy) in zip(centres, found, strict=True):
        assert abs(cx - fx) < SIDE / 4 and abs(cy - fy) < SIDE / 4, (centres, found)
    boxes, probs = expected(photo, "detect")
    assert [(f["box"]["x"], f["box"]["y"], f["box"]["w"], f["box"]["h"]) for f in faces] == [b[:4] for b in boxes]
    assert [f["score"] for f in faces] == pytest.approx([b.score for b in boxes])
    for face, row in zip(faces, probs, strict=True):
        assert np.allclose([face["probabilities"][label] for label in expected.labels], row, atol=1e-5)
        assert face["predicted_class"] == int(row.argmax())
        assert face["predicted_label"] == face["predicted_emotion"] == expected.labels[int(row.argmax())]
        assert face["confidence"] == pytest.approx(float(row.max()), abs=1e-5)
    assert {key: body[key] for key in RECORD} == {key: faces[0][key] for key in RECORD}
    # A 640x480 photo is not about the model's input size: the default mode (auto) detects too.
    assert post(service, photo).json()["faces"] == faces


@pytest.mark.slow
def test_whole_detect_and_auto_on_a_48x48_face(service, expected):
    whole = post(service, FACE_48, query="?faces=whole").json()
    assert whole["status"] == "ok" and whole["detected"] is False
    assert len(whole["faces"]) == 1 and whole["faces"][0]["box"] is None and whole["faces"][0]["score"] is None
    _, probs = expected(FACE_48, "whole")
    assert np.allclose([whole["probabilities"][label] for label in expected.labels], probs[0], atol=1e-5)
    auto = post(service, FACE_48).json()
    assert auto["faces"] == whole["faces"] and auto["detected"] is False
    # A face that fills a 48x48 image is smaller than the detector's window.
    detect = post(service, FACE_48, query="?faces=detect").json()
    assert detect["status"] == "no_face" and detect["faces"] == [] and detect["detected"] is True


@pytest.mark.slow
def test_a_photo_without_a_face_is_answered_no_face(service):
    flat = png(np.full((480, 640), 200, dtype=np.uint8))
    response = post(service, flat)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "no_face" and body["faces"] == []
    assert not set(RECORD) & set(body), "no top-level prediction without a face"
    assert (body["width"], body["height"]) == (640, 480)
    files = [("files", ("face.png", png(three_faces()), "image/png")), ("files", ("flat.png", flat, "image/png")),
             ("files", ("text.png", b"hello", "image/png"))]
    batch = httpx.post(service + "/predict/batch?faces=detect", files=files, headers=AUTH, timeout=120).json()
    assert [r["status"] for r in batch["results"]] == ["ok", "no_face", "error"]
    assert [len(r.get("faces", [])) for r in batch["results"]] == [3, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/predict", "/annotate", "/predict/batch"])
def test_an_unknown_faces_mode_is_refused_with_the_known_ones(service, path):
    response = httpx.post(f"{service}{path}?faces=everything", headers=AUTH, timeout=60,
                          files=[("files" if path.endswith("batch") else "file", ("f.jpg", FACE_48, "image/jpeg"))])
    assert response.status_code == 422
    assert response.json()["detail"] == "unknown faces mode 'everything'; known: whole, detect, auto"


@pytest.mark.slow
def test_fifty_faces_are_answered_in_one_forward_pass(service):
    """The deployment batches at most 16 images, yet a photo's faces are never split."""
    response = post(service, png(fifty_faces()), query="?faces=detect")
    assert response.status_code == 200, response.text
    faces = response.json()["faces"]
    assert len(faces) == 50
    assert len({(f["box"]["x"] // 110, f["box"]["y"] // 110) for f in faces}) == 50, "one box per grid cell"
    assert httpx.get(service + "/stats", headers=AUTH).json()["recent_batch_sizes"][-1] == 50


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/predict", "/annotate"])
def test_an_image_over_the_pixel_cap_is_refused_before_decoding(service, path):
    response = post(service, decompression_bomb(), path=path, query="?faces=detect")
    assert response.status_code == 413
    assert "too many pixels" in response.json()["detail"]


@pytest.mark.slow
def test_annotate_returns_the_photo_with_the_faces_boxed(service):
    original = three_faces()
    response = post(service, png(original), path="/annotate", query="?faces=detect")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(response.content)))
    assert drawn.shape == (480, 640, 3)
    changed = (drawn != original[:, :, None]).any(axis=2)
    faces = post(service, png(original), query="?faces=detect").json()["faces"]
    for face in faces:
        x, y, w, h = (face["box"][k] for k in "xywh")
        outline = np.concatenate([changed[y, x : x + w], changed[y + h - 1, x : x + w],
                                  changed[y : y + h, x], changed[y : y + h, x + w - 1]])
        assert outline.mean() > 0.9, "the box is drawn along its edges"
        assert not changed[y + h // 2, x + w // 2], "the face itself is left visible"
    # Below the first face and left of the second, nothing is drawn: the rest of the photo is intact.
    assert not changed[300:480, 0:200].any()
    whole = post(service, FACE_48, path="/annotate", query="?faces=whole")
    frame = np.asarray(Image.open(io.BytesIO(whole.content)))
    assert frame.shape == (48, 48, 3)
    source = np.asarray(Image.open(io.BytesIO(FACE_48)).convert("RGB"))
    assert (frame[-1] != source[-1]).any(axis=1).all(), "the whole image is framed as one face"


@pytest.mark.slow
def test_the_new_routes_need_the_token_and_the_page_does_not(service):
    for path in ("/annotate", "/predict?faces=detect"):
        response = httpx.post(service + path, files={"file": ("f.jpg", FACE_48, "image/jpeg")})
        assert response.status_code == 401 and response.json()["detail"] == "missing or wrong bearer token"
    assert httpx.get(service + "/").status_code == 200
    assert httpx.get(service + "/info").status_code == 200
