"""Face detection and framing: composed photos with faces at known places, no-face images, crops."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import emotion
from emotion.faces import Face, Framing, detector, detector_names, face_config, frame_face, load_face_config

ROOT = Path(__file__).resolve().parent.parent
FACES = ROOT / "examples" / "faces"
CONF = ROOT / "conf" / "faces.yaml"
SIDE = 144
# Three bundled FER2013 faces and the top-left corners they are pasted at on a 640x480 canvas.
PLACED = {
    "happy/PublicTest_10130075.jpg": (40, 40),
    "disgust/PublicTest_1145545.jpg": (250, 290),
    "fear/PublicTest_10150476.jpg": (460, 60),
}
LIBRARIES = {"haar": "cv2", "dlib_hog": "dlib"}


def three_faces() -> np.ndarray:
    canvas = np.full((480, 640), 128, dtype=np.uint8)
    for name, (x, y) in PLACED.items():
        face = Image.open(FACES / name).convert("L").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        canvas[y : y + SIDE, x : x + SIDE] = np.asarray(face)
    return canvas


def built(which: str):
    if which == "configured":
        config = load_face_config(CONF)
        pytest.importorskip(LIBRARIES[config.detector])
        return config.build()
    pytest.importorskip(LIBRARIES[which])
    return detector(which)


@pytest.mark.parametrize("which", ["configured", "haar", "dlib_hog"])
def test_three_composed_faces_give_three_boxes_in_place(which):
    faces = built(which).detect(three_faces())
    assert len(faces) == 3, faces
    for x, y in PLACED.values():
        centre = (x + SIDE / 2, y + SIDE / 2)
        hits = [
            f for f in faces
            if abs(f.x + f.w / 2 - centre[0]) < SIDE / 4 and abs(f.y + f.h / 2 - centre[1]) < SIDE / 4
        ]
        assert len(hits) == 1, (centre, faces)
        assert 0.6 * SIDE < hits[0].w < 1.4 * SIDE and 0.6 * SIDE < hits[0].h < 1.4 * SIDE, hits[0]


@pytest.mark.parametrize("which", ["configured", "haar", "dlib_hog"])
def test_rgb_input_finds_the_same_faces(which):
    gray = three_faces()
    det = built(which)
    assert det.detect(np.repeat(gray[:, :, None], 3, axis=2)) == det.detect(gray)


@pytest.mark.parametrize("which", ["configured", "haar", "dlib_hog"])
@pytest.mark.parametrize("kind", ["flat", "noise"])
def test_no_face_gives_no_box(which, kind):
    image = (
        np.full((480, 640), 200, dtype=np.uint8)
        if kind == "flat"
        else np.random.default_rng(0).integers(0, 256, (480, 640), dtype=np.uint8)
    )
    assert built(which).detect(image) == []


def test_unknown_detector_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown face detector 'yolo'; known: dlib_hog, haar"):
        detector("yolo")
    assert detector_names() == ("dlib_hog", "haar")


def test_unknown_haar_cascade_is_refused_by_name():
    pytest.importorskip("cv2")
    with pytest.raises(ValueError, match=r"unknown Haar cascade 'frontalface_nope'; known: .*frontalface_default"):
        detector("haar", cascade="frontalface_nope")


def test_importing_emotion_does_not_import_detector_libraries():
    import subprocess
    import sys

    code = "import sys, emotion, emotion.faces; print('cv2' in sys.modules, 'dlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]
    assert emotion.__name__ == "emotion"


def gradient(height: int = 100, width: int = 120) -> np.ndarray:
    """Pixel value = column index, so a crop's columns say where in the image it came from."""
    return np.tile(np.arange(width, dtype=np.uint8), (height, 1))


def test_frame_face_cuts_the_framed_square_inside_the_image():
    image = gradient()
    crop = frame_face(image, Face(40, 30, 20, 20, 1.0), Framing(scale=2.0, offset=0.0), size=40)
    assert crop.shape == (40, 40) and crop.dtype == np.uint8
    # Box centre x = 50, crop side 40: columns 30..69, resized 1:1.
    assert crop[0, 0] == 30 and crop[0, -1] == 69


def test_frame_face_offset_moves_the_crop_down_by_box_heights():
    image = gradient().T.copy()  # value = row index
    crop = frame_face(image, Face(30, 40, 20, 20, 1.0), Framing(scale=1.0, offset=0.5), size=20)
    # Box centre y = 50, moved by 10: rows 50..69.
    assert crop[0, 0] == 50 and crop[-1, 0] == 69


def test_frame_face_square_uses_the_longer_side_and_keeps_channels():
    image = np.repeat(gradient()[:, :, None], 3, axis=2)
    crop = frame_face(image, (50, 20, 10, 30), Framing(scale=1.0, offset=0.0, square=True), size=30)
    assert crop.shape == (30, 30, 3)
    assert crop[0, 0, 0] == 40 and crop[0, -1, 0] == 69
    single = frame_face(image[:, :, :1], (50, 20, 10, 30), Framing(1.0, 0.0), size=30)
    assert single.shape == (30, 30, 1)
    stretched = frame_face(image, (50, 20, 10, 30), Framing(scale=1.0, offset=0.0, square=False), size=30)
    assert stretched[0, 0, 0] == 50 and stretched[0, -1, 0] == 59


def test_frame_face_pads_with_edge_pixels_at_the_border():
    image = gradient()
    crop = frame_face(image, Face(-10, -10, 30, 30, 1.0), Framing(1.0, 0.0), size=30)
    assert crop.shape == (30, 30)
    # Columns -10..19: the ten outside repeat column 0, the rest are the image's own.
    assert list(crop[0, :12]) == [0] * 11 + [1]
    assert crop[0, -1] == 19
    far = frame_face(image, Face(500, 500, 10, 10, 1.0), Framing(1.0, 0.0), size=8)
    assert far.shape == (8, 8) and (far == 119).all()


def test_frame_face_refuses_an_empty_box():
    with pytest.raises(ValueError, match="empty face box"):
        frame_face(gradient(), (0, 0, 0, 5), Framing(1.0, 0.0), size=48)


def test_face_config_reads_the_shipped_file_and_refuses_unknown_keys():
    config = load_face_config(CONF)
    assert config.detector in detector_names()
    assert config.framing.scale > 0
    with pytest.raises(ValueError, match=r"unknown key.*: framin"):
        face_config({"detector": "haar", "framin": {}})
    with pytest.raises(ValueError, match="face config"):
        face_config({"detector": "haar", "framing": {"scale": 1.2}})


def test_a_fallback_threshold_finds_an_atypical_face_and_never_adds_boxes_beside_a_confident_one():
    pytest.importorskip("dlib")
    turned = Image.open(FACES / "surprise" / "PublicTest_10780425.jpg").convert("L").resize((192, 192))
    turned = np.asarray(turned.rotate(25, resample=Image.Resampling.BILINEAR, fillcolor=128))
    strict = detector("dlib_hog", border=0.3)
    lenient = detector("dlib_hog", border=0.3, fallback_threshold=-0.6)
    assert strict.detect(turned) == []
    (face,) = lenient.detect(turned)
    assert -0.6 <= face.score < 0 and 20 <= face.x + face.w / 2 <= 172
    canvas = three_faces()
    assert lenient.detect(canvas) == strict.detect(canvas)
    assert lenient.detect(np.full((240, 320), 128, np.uint8)) == []
    with pytest.raises(ValueError, match="must not exceed threshold"):
        detector("dlib_hog", threshold=-1.0, fallback_threshold=0.0)
