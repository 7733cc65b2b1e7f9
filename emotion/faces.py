"""Faces in photos: detectors behind one interface, and the crop the classifier is given.

The classifier was trained on FER2013's crops, so a face found in a photo must be cut out the way
FER2013 cut its faces, not the way a detector happens to draw its box. `Framing` holds that
relation (measured, see docs/benchmarks.md) and lives in a config file (conf/faces.yaml), so a new
detector or a retrained model changes data, not code.

Detectors are built by name through a registry: the job, the evaluation and the endpoint call
`detector(name, **params)` and never import OpenCV or dlib themselves, so adding one is a function
decorated with `@register_detector` here. Those libraries are imported by the constructors, so
`import emotion` costs nothing for callers that never detect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import yaml
from PIL import Image

from emotion.preprocess import DEFAULT_MAX_PIXELS, decode_image, decode_upright


class Face(NamedTuple):
    """One detected face: a box in pixels of the image given to the detector, and its score.

    A box may reach past the image's edges when the face does (a face cut by the border):
    clipping it would move its centre and shrink it, and `frame_face` pads instead.

    Scores are each detector's own confidence (not probabilities, not comparable across
    detectors); they order faces within one image.
    """

    x: int
    y: int
    w: int
    h: int
    score: float


class FaceDetector(Protocol):
    """Anything that finds faces: an upright uint8 image (HxW gray, HxWx1 or HxWx3 RGB) in,
    faces out, largest first. Must be safe to call repeatedly from one thread."""

    def detect(self, image: np.ndarray) -> list[Face]: ...


_REGISTRY: dict[str, Callable[..., FaceDetector]] = {}


def register_detector(name: str) -> Callable[[Callable[..., FaceDetector]], Callable[..., FaceDetector]]:
    """Make a detector constructor available as `detector(name, **params)`."""

    def add(factory: Callable[..., FaceDetector]) -> Callable[..., FaceDetector]:
        if name in _REGISTRY:
            raise ValueError(f"face detector {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return add


def detector_names() -> tuple[str, ...]:
    """Names `detector` accepts, sorted."""
    return tuple(sorted(_REGISTRY))


def detector(name: str, **params: Any) -> FaceDetector:
    """The detector registered as `name`, built with `params` (its config's parameters).

    An unknown name is refused with the known ones listed, since it usually comes from a config
    file or a flag a user typed.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown face detector {name!r}; known: {', '.join(detector_names())}")
    return _REGISTRY[name](**params)


def to_gray(image: np.ndarray) -> np.ndarray:
    """HxW uint8 luminance of an HxW, HxWx1 or HxWx3 (RGB) uint8 image, as Pillow computes it."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return np.asarray(Image.fromarray(image, "RGB").convert("L"))
    raise ValueError(f"expected an HxW, HxWx1 or HxWx3 image, got shape {image.shape}")


def _largest_first(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: (-f.w * f.h, -f.score))


def _with_border(gray: np.ndarray, border: float) -> tuple[np.ndarray, int]:
    """`gray` inside a flat frame of `border` times its shorter side, and the frame's width.

    Both detectors miss faces that touch the image's edge (loose crops where the face fills the
    picture), because their windows need the face's outline; a frame of the image's mean grey
    gives them that outline without inventing structure as reflected or repeated edges would.
    """
    width = round(border * min(gray.shape))
    if width == 0:
        return gray, 0
    return np.pad(gray, width, mode="constant", constant_values=int(gray.mean())), width


def _unframed(face: Face, shift: int) -> Face:
    """`face` found in a framed image, in the original image's pixels."""
    return face._replace(x=face.x - shift, y=face.y - shift)


class HaarDetector:
    """OpenCV's Viola-Jones cascades, whose XML files ship in the opencv-python-headless wheel.

    `min_size` is a fraction of the image's shorter side, so one setting serves a 256x256 crop and
    a 1280x960 photo alike; it is also what keeps large photos cheap, since OpenCV skips every
    pyramid level whose window is smaller. Each face's score is the cascade's last-stage sum.
    `border` frames the image before detection (see `_with_border`), as a fraction of its
    shorter side.
    """

    def __init__(
        self,
        cascade: str = "frontalface_default",
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: float = 0.1,
        equalize: bool = False,
        border: float = 0.0,
    ) -> None:
        import cv2

        path = Path(cv2.data.haarcascades) / f"haarcascade_{cascade}.xml"
        if not path.is_file():
            known = sorted(p.stem.removeprefix("haarcascade_") for p in path.parent.glob("haarcascade_*.xml"))
            raise ValueError(f"unknown Haar cascade {cascade!r}; known: {', '.join(known)}")
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(str(path))
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size = min_size
        self.equalize = equalize
        self.border = border

    def detect(self, image: np.ndarray) -> list[Face]:
        gray = to_gray(image)
        if self.equalize:
            gray = self._cv2.equalizeHist(gray)
        side = max(1, round(self.min_size * min(gray.shape)))
        framed, shift = _with_border(gray, self.border)
        boxes, _, weights = self._cascade.detectMultiScale3(
            framed,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(side, side),
            outputRejectLevels=True,
        )
        found = [Face(int(x), int(y), int(w), int(h), float(s)) for (x, y, w, h), s in zip(boxes, weights, strict=True)]
        return _largest_first([_unframed(f, shift) for f in found])


class DlibHogDetector:
    """dlib's HOG + linear SVM frontal face detector, whose model is compiled into dlib-bin.

    dlib has no minimum face size: it scans every pyramid level from the full image down, so
    images are first shrunk to `max_side` pixels on their longer side (None: never), and
    `upsample` doubles the image that many times to find faces under its 80-pixel window.
    `threshold` moves the SVM's decision boundary (dlib's `adjust_threshold`); `border` frames
    the image before detection (see `_with_border`). With `fallback_threshold` (lower), an image
    where nothing reaches `threshold` keeps the boxes that reach the fallback instead: a face that
    is there but atypical (turned, unevenly lit) still gets a box, while an image with a confident
    face never gains low-scoring ones. One scan serves both, at the lower threshold.
    """

    def __init__(
        self,
        upsample: int = 0,
        threshold: float = 0.0,
        max_side: int | None = None,
        border: float = 0.0,
        fallback_threshold: float | None = None,
    ) -> None:
        import dlib

        if fallback_threshold is not None and fallback_threshold > threshold:
            raise ValueError(f"fallback_threshold {fallback_threshold} must not exceed threshold {threshold}")
        self._detector = dlib.get_frontal_face_detector()
        self.upsample = upsample
        self.threshold = threshold
        self.max_side = max_side
        self.border = border
        self.fallback_threshold = fallback_threshold

    def detect(self, image: np.ndarray) -> list[Face]:
        gray = to_gray(image)
        factor = 1.0
        if self.max_side and max(gray.shape) > self.max_side:
            factor = max(gray.shape) / self.max_side
            size = (round(gray.shape[1] / factor), round(gray.shape[0] / factor))
            gray = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))
        framed, shift = _with_border(gray, self.border)
        lowest = self.threshold if self.fallback_threshold is None else self.fallback_threshold
        rects, scores, _ = self._detector.run(framed, self.upsample, lowest)
        found = list(zip(rects, scores, strict=True))
        if any(score >= self.threshold for _, score in found):
            found = [(rect, score) for rect, score in found if score >= self.threshold]
        faces = []
        for rect, score in found:
            face = _unframed(Face(rect.left(), rect.top(), rect.width(), rect.height(), float(score)), shift)
            faces.append(
                Face(
                    round(face.x * factor),
                    round(face.y * factor),
                    round(face.w * factor),
                    round(face.h * factor),
                    face.score,
                )
            )
        return _largest_first(faces)


register_detector("haar")(HaarDetector)
register_detector("dlib_hog")(DlibHogDetector)


@dataclass(frozen=True)
class Framing:
    """Where the classifier's crop lies relative to a detector's box.

    The crop is centred on the box's centre moved down by `offset` box heights; its sides are
    `scale` times the box's (both times the longer side when `square`). Values come from a
    config, measured for one detector against the model's training crops.
    """

    scale: float
    offset: float
    square: bool = True


def frame_face(image: np.ndarray, box: Face | tuple[int, int, int, int], framing: Framing, size: int) -> np.ndarray:
    """The `size`x`size` crop of `image` the classifier should see for the face in `box`.

    Parts of the crop outside the image repeat its edge pixels: a face at a photo's border keeps
    its position in the crop instead of being stretched or shifted, and no artificial black edge
    appears that the classifier never saw in training. The result has the input's layout (HxW or
    HxWxC) and dtype.
    """
    x, y, w, h = box[:4]
    if w <= 0 or h <= 0:
        raise ValueError(f"empty face box: {tuple(box[:4])}")
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty HxW or HxWxC image, got shape {image.shape}")
    crop_w, crop_h = (max(w, h), max(w, h)) if framing.square else (w, h)
    crop_w, crop_h = max(1, round(crop_w * framing.scale)), max(1, round(crop_h * framing.scale))
    centre_x, centre_y = x + w / 2, y + h / 2 + framing.offset * h
    left, top = round(centre_x - crop_w / 2), round(centre_y - crop_h / 2)
    height, width = image.shape[:2]
    inside = image[max(top, 0) : min(top + crop_h, height), max(left, 0) : min(left + crop_w, width)]
    if inside.size == 0:
        edge_y, edge_x = min(max(top, 0), height - 1), min(max(left, 0), width - 1)
        inside = image[edge_y : edge_y + 1, edge_x : edge_x + 1]
        pad = [(0, crop_h - 1), (0, crop_w - 1)]
    else:
        pad = [
            (max(-top, 0), crop_h - inside.shape[0] - max(-top, 0)),
            (max(-left, 0), crop_w - inside.shape[1] - max(-left, 0)),
        ]
    if image.ndim == 3:
        pad.append((0, 0))
    crop = np.pad(inside, pad, mode="edge") if any(p != (0, 0) for p in pad) else inside
    squeeze = crop.ndim == 3 and crop.shape[2] == 1
    pil = Image.fromarray(crop[:, :, 0] if squeeze else crop)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))
    return resized[:, :, None] if squeeze else resized


@dataclass(frozen=True)
class AutoRule:
    """Which images `faces: auto` takes whole: those already about the model's input, meaning a
    longer side of at most `max_scale` times the input size and sides within `max_aspect` of
    each other. A detector cannot find a face in such an image anyway (its window is larger)."""

    max_scale: float
    max_aspect: float

    def takes_whole(self, width: int, height: int, size: int) -> bool:
        """Whether an upright `width` x `height` image is classified whole under `auto`."""
        long, short = max(width, height), max(min(width, height), 1)
        return long <= self.max_scale * size and long / short <= self.max_aspect


@dataclass(frozen=True)
class FaceConfig:
    """A detector by name with its parameters, the framing measured for it, and the rule by which
    `faces: auto` decides between the whole image and detection."""

    detector: str
    framing: Framing
    auto: AutoRule
    params: dict[str, Any] = field(default_factory=dict)

    def build(self) -> FaceDetector:
        """The configured detector, ready to call."""
        return detector(self.detector, **self.params)


def face_config(values: Mapping[str, Any]) -> FaceConfig:
    """A `FaceConfig` from a mapping such as conf/faces.yaml; unknown keys are refused by name."""
    known = {"detector", "params", "framing", "auto"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"face config: unknown key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return FaceConfig(
            values["detector"],
            Framing(**(values.get("framing") or {})),
            AutoRule(**(values.get("auto") or {})),
            dict(values.get("params") or {}),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"face config: {exc}") from exc


def load_face_config(path: str | Path) -> FaceConfig:
    """The face config in a YAML file (conf/faces.yaml holds the default)."""
    with Path(path).open() as f:
        return face_config(yaml.safe_load(f) or {})


FACE_MODES = ("whole", "detect", "auto")


class FaceCrop(NamedTuple):
    """What the classifier sees for one face: `pixels` (size x size x channels uint8), and `face`,
    its box in pixels of the upright image (None when the whole image is taken as the face)."""

    pixels: np.ndarray
    face: Face | None


class FacesInImage(NamedTuple):
    """One image's faces, largest first: empty with `error` set when the image cannot be decoded,
    empty without an error when detection found no face. `width` and `height` are the upright
    image's; `detected` says whether the detector ran (`detect`, or `auto` on a photo)."""

    crops: list[FaceCrop]
    width: int
    height: int
    error: str | None
    detected: bool


class FaceFinder:
    """Bytes to the crops the classifier should see, under a `faces` mode: the one path the batch
    job, the evaluation and the endpoint share, so a face is cut the same way everywhere.

    The detector is built on first use, so `whole` never imports a detection library. Photos are
    decoded at a reduced JPEG scale when that still covers what detection needs (the detector's
    `max_side`, if it has one, else the full image), and boxes are reported in the upright
    image's own pixels.
    """

    def __init__(self, config: FaceConfig, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.config = config
        self.size, self.channels, self.max_pixels = size, channels, max_pixels
        self._detector: FaceDetector | None = None

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = self.config.build()
        return self._detector

    def find(self, data: bytes, mode: str) -> FacesInImage:
        """The faces of the image in `data` under `mode` (one of `FACE_MODES`)."""
        if mode not in FACE_MODES:
            raise ValueError(f"faces: unknown mode {mode!r}; known: {', '.join(FACE_MODES)}")
        if mode == "whole":
            return self._whole(data)
        max_side = self.config.params.get("max_side")
        draft = (max_side, max_side) if max_side else None
        decoded = decode_upright(data, self.channels, self.max_pixels, draft)
        if decoded.pixels is None:
            return FacesInImage([], decoded.width, decoded.height, decoded.error, False)
        if mode == "auto" and self.config.auto.takes_whole(decoded.width, decoded.height, self.size):
            return self._whole(data)
        image = decoded.pixels
        factor = decoded.width / image.shape[1]
        crops = [
            FaceCrop(frame_face(image, face, self.config.framing, self.size), _scaled(face, factor))
            for face in self.detector.detect(image)
        ]
        return FacesInImage(crops, decoded.width, decoded.height, None, True)

    def _whole(self, data: bytes) -> FacesInImage:
        decoded = decode_image(data, self.size, self.channels, self.max_pixels)
        crops = [] if decoded.pixels is None else [FaceCrop(decoded.pixels, None)]
        return FacesInImage(crops, decoded.width, decoded.height, decoded.error, False)


def _scaled(face: Face, factor: float) -> Face:
    if factor == 1.0:
        return face
    return face._replace(
        x=round(face.x * factor), y=round(face.y * factor), w=round(face.w * factor), h=round(face.h * factor)
    )
