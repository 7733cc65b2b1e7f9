"""Labelled sets: images with their class from the folder they sit in, joined with predictions,
and each set's entry of the report.

A folder counts as known when its alias maps onto one of the model's labels, or when it spells
one exactly (a model trained with an extra class); anything else stays unknown under its name and
is counted apart, never mapped onto a neighbour.

A labelled photo is one answer, whatever the number of faces found in it: its largest face (face
index 0, as the scoring pipeline orders them). A photo in which no face was found is a miss, never
dropped, since dropping it would flatter a detector that gives up on hard photos.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from emotion.evaluation.metrics import classification_metrics
from emotion.folders import list_labelled_images
from emotion.labels import canonical_label
from emotion.uris import strip_scheme


@dataclass(frozen=True)
class LabelledSet:
    """One set to evaluate: every image with its folder and its class id in the model's labels
    (-1 for a folder that names no class the model knows)."""

    name: str
    uri: str
    paths: list[str]
    folders: list[str]
    classes: list[int]
    # whole | detect | auto: how faces are taken from this set's images (emotion.faces).
    faces: str


def read_labelled_set(name: str, uri: str, labels: tuple[str, ...], faces: str) -> LabelledSet:
    """A set's images with class ids in `labels` order.

    Raises FileNotFoundError, PermissionError, or ValueError saying why nothing could be scored.
    """
    found = list_labelled_images(uri)
    root = strip_scheme(uri) + "/"
    by_folder: dict[str, list[str]] = dict(found.unknown)
    for path in found.paths:
        # Images may sit deeper than the class folder; the first component below the root names it.
        by_folder.setdefault(strip_scheme(path).removeprefix(root).split("/")[0], []).append(path)
    paths, folders, classes = [], [], []
    for folder, images in sorted(by_folder.items()):
        label = canonical_label(folder) or folder.strip().lower()
        class_id = labels.index(label) if label in labels else -1
        paths += images
        folders += [folder] * len(images)
        classes += [class_id] * len(images)
    if not any(c >= 0 for c in classes):
        with_images = ", ".join(sorted(by_folder)) or "none"
        raise ValueError("no images in a sub-folder naming a class the model knows "
                         f"(sub-folders with images: {with_images})")
    return LabelledSet(name, uri, paths, folders, classes, faces)


def join_truth(predictions: pd.DataFrame, labelled: LabelledSet, labels: tuple[str, ...]) -> pd.DataFrame:
    """One row per image: the pipeline's row of its largest face (face index 0; the one row of an
    image with no face or an error), keyed by `path` without scheme, with the image's URI, folder
    and true class; refuses a prediction set that does not match the images one to one."""
    predictions = predictions[predictions["face_index"] == 0]
    truth = pd.DataFrame({
        "path": [strip_scheme(p) for p in labelled.paths],
        "uri": labelled.paths,
        "folder": labelled.folders,
        "true_class": np.asarray(labelled.classes, dtype=np.int16),
    })
    if len(predictions) != len(truth) or set(predictions["path"]) != set(truth["path"]):
        raise RuntimeError(f"set {labelled.name}: the pipeline returned {len(predictions)} rows "
                           f"for {len(truth)} images")
    df = truth.merge(predictions, on="path", validate="one_to_one").sort_values("path", ignore_index=True)
    df.insert(3, "true_label", [labels[c] if c >= 0 else None for c in df["true_class"]])
    return df


def set_result(labelled: LabelledSet, df: pd.DataFrame, labels: tuple[str, ...], bins: int, gallery: int,
               efficiency: dict[str, Any], predictions: str) -> dict[str, Any]:
    """One set's entry of report.json: counts, exclusions, faces found, metrics, errors,
    efficiency, mistakes. Images with no face found are evaluated, as misses."""
    ok, known, no_face = df["status"] == "ok", df["true_class"] >= 0, df["status"] == "no_face"
    scored = df[(ok | no_face) & known]
    probs = scored[[f"prob_{label}" for label in labels]].to_numpy(dtype=float)
    metrics = classification_metrics(scored["true_class"].to_numpy(), scored["predicted_class"].to_numpy(),
                                     probs, labels, bins)
    unknown = {
        folder: {
            "n_images": len(rows),
            "n_errors": int((rows["status"] == "error").sum()),
            "n_no_face": int((rows["status"] == "no_face").sum()),
            "predicted": {label: int((rows["predicted_label"] == label).sum()) for label in labels},
        }
        for folder, rows in df[~known].groupby("folder")
    }
    errors = df[df["status"] == "error"]
    readable = len(df) - len(errors)
    # Detection ran on an image when it has a box, or when it found nothing.
    detected = int((df["box_w"].notna() | no_face).sum())
    # The gallery shows answers: an image with no face found has no confidence to rank it by.
    wrong = scored[(scored["status"] == "ok") & (scored["predicted_class"] != scored["true_class"])]
    mistakes = wrong.sort_values(["confidence", "path"], ascending=[False, True]).head(gallery)
    return {
        "name": labelled.name,
        "input": labelled.uri,
        "predictions": predictions,
        "faces": labelled.faces,
        "n_images": len(df),
        "n_errors": len(errors),
        "n_no_face": int(no_face.sum()),
        "n_detected": detected,
        "faces_found": (readable - int(no_face.sum())) / readable if readable else None,
        "n_excluded_unknown": int((~known).sum()),
        **metrics,
        "unknown_classes": unknown,
        "errors": [{"path": p, "error": e} for p, e in zip(errors["uri"], errors["error"], strict=True)],
        "efficiency": efficiency,
        "most_confident_mistakes": [
            {"path": r.uri, "true_label": r.true_label, "predicted_label": r.predicted_label,
             "confidence": float(r.confidence), "face_index": int(r.face_index),
             "box": None if pd.isna(r.box_w) else [int(r.box_x), int(r.box_y), int(r.box_w), int(r.box_h)]}
            for r in mistakes.itertuples()
        ],
    }
