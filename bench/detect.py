"""Face detector candidates side by side: faces found, extra boxes, images/s per core at two sizes.

Both shared sets hold one face per image, so "found" is the share of images with at least one box
and "extra" counts images with more than one (every box beyond the first is a false one or a
duplicate). Speed is measured on one core (OpenCV limited to one thread; dlib uses one) on
Taiwanese photos at their own 256x256 and on the same photos cut to 4:3 and enlarged to 1280x960,
the size of a phone snapshot after downscaling. `--sheet DIR` saves, per candidate, a contact
sheet of images with extra boxes and of misses, to look at.

    python bench/detect.py [--data ../shared/data] [--every 1] [--speed-images 60] [--sheet /tmp/faces]
"""

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from emotion.faces import Face, FaceDetector, detector, load_face_config
from emotion.folders import list_labelled_images

ROOT = Path(__file__).resolve().parent.parent
SETS = ("taiwanese", "lfw_expressions")
# Only the chosen detector's package is a dependency; the others are measured when installed.
LIBRARIES = {"haar": "cv2", "dlib_hog": "dlib"}
PACKAGES = {"haar": "'opencv-python-headless>=4.8,<5'", "dlib_hog": "'dlib-bin>=20.0,<21'"}

# (label, detector name, parameters). The configured default is added first at run time.
CANDIDATES: list[tuple[str, str, dict]] = [
    ("haar OpenCV defaults", "haar", {"min_neighbors": 3, "min_size": 0.0}),
    ("haar min_neighbors 5, min_size 0.1", "haar", {"min_neighbors": 5, "min_size": 0.1}),
    ("haar min_neighbors 5, min_size 0.1, border 0.3", "haar", {"min_neighbors": 5, "min_size": 0.1, "border": 0.3}),
    ("dlib_hog", "dlib_hog", {}),
    ("dlib_hog border 0.3", "dlib_hog", {"border": 0.3}),
]


def gray_images(folder: Path, every: int) -> list[np.ndarray]:
    """Every `every`-th labelled image under `folder`, upright grayscale (unknown classes too)."""
    listing = list_labelled_images(str(folder))
    paths = sorted(listing.paths + [p for ps in listing.unknown.values() for p in ps])[::every]
    return [np.asarray(Image.open(p).convert("L")) for p in paths]


def snapshot(image: np.ndarray) -> np.ndarray:
    """A 256x256 photo cut to 4:3 around its centre and enlarged to 1280x960."""
    height = image.shape[0]
    cut = round(height * 3 / 8)
    tall = image[max(height // 2 - cut, 0) : height // 2 + cut, :]
    return np.asarray(Image.fromarray(tall).resize((1280, 960), Image.Resampling.BILINEAR))


def per_second(det: FaceDetector, images: list[np.ndarray]) -> float:
    det.detect(images[0])
    started = time.perf_counter()
    for image in images:
        det.detect(image)
    return len(images) / (time.perf_counter() - started)


def contact_sheet(items: list[tuple[np.ndarray, list[Face]]], path: Path, tiles: int = 24) -> None:
    side = 160
    sheet = Image.new("RGB", (side * 6, side * max(1, (min(len(items), tiles) + 5) // 6)))
    for i, (image, faces) in enumerate(items[:tiles]):
        tile = Image.fromarray(image).convert("RGB")
        draw = ImageDraw.Draw(tile)
        for f in faces:
            draw.rectangle([f.x, f.y, f.x + f.w, f.y + f.h], outline=(255, 0, 0), width=3)
        sheet.paste(tile.resize((side, side)), (side * (i % 6), side * (i // 6)))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--conf", default=str(ROOT / "conf" / "faces.yaml"), help="the default detector's config")
    parser.add_argument("--every", type=int, default=1, help="use every N-th image of each set")
    parser.add_argument("--speed-images", type=int, default=60, help="photos timed at each size")
    parser.add_argument("--sheet", help="folder for contact sheets of extra boxes and misses")
    args = parser.parse_args()
    if importlib.util.find_spec("cv2"):
        import cv2

        cv2.setNumThreads(1)
    conf = load_face_config(args.conf)
    candidates = [(f"{conf.detector} (conf/faces.yaml)", conf.detector, conf.params), *CANDIDATES]
    images = {name: gray_images(Path(args.data) / name, args.every) for name in SETS}
    small = images["taiwanese"][:: max(1, len(images["taiwanese"]) // args.speed_images)][: args.speed_images]
    large = [snapshot(image) for image in small[: max(1, args.speed_images // 4)]]
    print(f"images: {', '.join(f'{k} {len(v)}' for k, v in images.items())}; timed: {len(small)} at 256x256, "
          f"{len(large)} at 1280x960, one core")
    columns = " | ".join(f"{s} found | {s} extra" for s in SETS)
    header = f"| candidate | {columns} | img/s 256x256 | img/s 1280x960 |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    reference = None
    for label, name, params in candidates:
        if not importlib.util.find_spec(LIBRARIES[name]):
            print(f"| {label} | not installed: pip install {PACKAGES[name]} |")
            continue
        det = detector(name, **params)
        cells, misses, extras = [], [], []
        for set_name in SETS:
            found = [det.detect(image) for image in images[set_name]]
            counts = np.array([len(f) for f in found])
            cells += [f"{np.mean(counts >= 1):.1%}", f"{int(np.sum(counts > 1))}"]
            misses += [(im, f) for im, f in zip(images[set_name], found, strict=True) if not f]
            extras += [(im, f) for im, f in zip(images[set_name], found, strict=True) if len(f) > 1]
        speed_small, speed_large = per_second(det, small), per_second(det, large)
        reference = reference or speed_small
        cells += [f"{speed_small:.0f} ({speed_small / reference:.2f}x)", f"{speed_large:.1f}"]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        if args.sheet:
            folder = Path(args.sheet)
            folder.mkdir(parents=True, exist_ok=True)
            slug = "".join(c if c.isalnum() else "_" for c in label)
            contact_sheet(extras, folder / f"{slug}_extra.png")
            contact_sheet(misses, folder / f"{slug}_miss.png")


if __name__ == "__main__":
    main()
