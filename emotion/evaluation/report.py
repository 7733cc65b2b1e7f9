"""The evaluation report as one self-contained HTML page: figures and thumbnails are embedded.

A person opens report.html from a bucket or an e-mail attachment; it must not fetch anything, so
plots are base64 PNG and the gallery's thumbnails are small base64 JPEGs made here. A thumbnail
shows the crop the classifier was given (the framed face in a photo), not the file: a mistake
on a photo is often a mistake of framing or of which face was taken.
"""

import base64
import io
from html import escape
from typing import Any

import numpy as np
from PIL import Image

from emotion.evaluation.plots import confusion_heatmap, reliability_diagram
from emotion.explain import Explainer, overlay, png_bytes
from emotion.faces import FaceFinder
from emotion.folders import read_many

THUMBNAIL = 96

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
.muted{color:#666} .gate{padding:10px 14px;border-radius:6px;font-weight:600}
.pass{background:#e3f4e6;color:#1b5e20} .fail{background:#fde4e4;color:#b71c1c}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:22px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left} .figs{display:flex;gap:16px;flex-wrap:wrap}
.gallery{display:flex;flex-wrap:wrap;gap:10px} .gallery figure{margin:0;width:120px;font-size:12px}
.gallery img{width:96px;height:96px;object-fit:contain;background:#eee;display:block}
.gallery figure:has(.pair){width:200px} .pair{display:flex;gap:4px}
.down{color:#b71c1c} .up{color:#1b5e20}
"""


def thumbnail(pixels: np.ndarray, size: int = THUMBNAIL) -> str:
    """A base64 JPEG of a classifier's input (HxWxC uint8), enlarged to size x size so that a
    48-pixel face can be seen; nearest-neighbour, so the pixels shown are the pixels classified."""
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.NEAREST).save(buffer, "JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def with_crops(mistakes: list[dict[str, Any]], finder: FaceFinder, faces: str,
               explainer: Explainer | None = None) -> list[dict[str, Any]]:
    """Each mistake with the thumbnail of the crop its prediction was made on (None when the file
    no longer yields it): the file is read again and cut by a FaceFinder built from the settings
    the pipeline used, which is deterministic, so the crop is the one classified.

    With an `explainer`, each crop also gets `overlay`: a base64 PNG of its Grad-CAM heatmap for
    the class the model predicted, so a reviewer sees what the wrong answer rested on. Only the
    gallery's few faces are explained, in one batch, here in the driver: the pipeline never pays
    for gradients."""
    images = read_many([m["path"] for m in mistakes])
    shown = []
    pixels = {}
    for i, (mistake, data) in enumerate(zip(mistakes, images, strict=True)):
        crops = finder.find(data, faces).crops
        index = mistake["face_index"]
        if index < len(crops):
            pixels[i] = crops[index].pixels
        shown.append(mistake | {"thumbnail": thumbnail(crops[index].pixels) if index < len(crops) else None})
    if explainer is not None and pixels:
        labels = explainer.checkpoint.labels
        order = sorted(pixels)
        explanations = explainer.explain(np.stack([pixels[i] for i in order]),
                                         [labels.index(shown[i]["predicted_label"]) for i in order])
        for i, explanation in zip(order, explanations, strict=True):
            image = overlay(pixels[i], explanation.heatmap, side=THUMBNAIL)
            shown[i]["overlay"] = base64.b64encode(png_bytes(image)).decode("ascii")
    return shown


def _num(value: float | None, digits: int = 3) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "&ndash;" if value is None else f"{100 * value:.1f}%"


def _delta(current: float | None, reference: float | None) -> str:
    if current is None or reference is None:
        return ""
    change = current - reference
    css = "down" if change < 0 else "up"
    return f' <span class="{css}">({100 * change:+.1f} pts)</span>'


def _card(title: str, value: str) -> str:
    return f'<div class="card"><span class="muted">{escape(title)}</span><b>{value}</b></div>'


def _headline(result: dict[str, Any], comparison: dict[str, Any]) -> str:
    previous = comparison.get("previous", {}).get(result["name"], {})
    baseline = comparison.get("baseline", {}).get(result["name"], {})
    efficiency = result["efficiency"]

    def with_deltas(metric: str) -> str:
        value = result[metric]
        text = _pct(value)
        if metric in previous:
            text += f"<br><small>vs previous{_delta(value, previous[metric]['reference'])}</small>"
        if metric in baseline:
            text += f"<br><small>vs baseline{_delta(value, baseline[metric]['reference'])}</small>"
        return text

    cards = [
        _card("accuracy", with_deltas("accuracy")),
        _card("macro F1", with_deltas("macro_f1")),
        _card("top-2 accuracy", _pct(result["top2_accuracy"])),
        _card("ECE", _num(result["ece"])),
        _card("evaluated / images", f"{result['n_evaluated']} / {result['n_images']}"),
        _card(f"faces found ({result['faces']})", _pct(result["faces_found"])),
        _card("unreadable", str(result["n_errors"])),
        _card("excluded (unknown class)", str(result["n_excluded_unknown"])),
        _card("images/s", _num(efficiency["images_per_s"], 1)),
        _card("inference ms/image", _num(efficiency["mean_inference_ms"], 2)),
        _card("peak memory MB", _num(efficiency["peak_rss_mb"], 0)),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _per_class_table(result: dict[str, Any]) -> str:
    rows = []
    for label, scores in result["per_class"].items():
        rows.append(
            f"<tr><td>{escape(label)}</td><td>{_num(scores['precision'])}</td><td>{_num(scores['recall'])}</td>"
            f"<td>{_num(scores['f1'])}</td><td>{scores['support']}</td><td>{scores['predicted']}</td></tr>"
        )
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>predicted</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _notes(result: dict[str, Any]) -> str:
    notes = []
    if result["absent_classes"]:
        notes.append(f"Classes with no images in this set: {escape(', '.join(result['absent_classes']))}.")
    for name, info in result["unknown_classes"].items():
        spread = ", ".join(f"{escape(k)} {v}" for k, v in info["predicted"].items() if v)
        notes.append(
            f"Folder <b>{escape(name)}</b> is a class the model does not know: {info['n_images']} images "
            f"excluded from the metrics (predicted as: {spread or 'none readable'})."
        )
    if result["n_no_face"]:
        notes.append(f"No face found in {result['n_no_face']} images: each counts as a mistake for its "
                     "class, and stays out of calibration (there is no confidence).")
    if result["errors"]:
        items = "".join(f"<li>{escape(e['path'])}: {escape(str(e['error']))}</li>" for e in result["errors"][:50])
        more = len(result["errors"]) - 50
        notes.append(f"Unreadable images ({len(result['errors'])}):<ul>{items}</ul>"
                     + (f"<p>and {more} more in report.json</p>" if more > 0 else ""))
    return "".join(f"<p>{n}</p>" for n in notes)


def _gallery(mistakes: list[dict[str, Any]]) -> str:
    if not mistakes:
        return "<p class='muted'>No mistakes.</p>"
    figures = []
    for m in mistakes:
        image = (f'<img alt="" src="data:image/jpeg;base64,{m["thumbnail"]}">' if m.get("thumbnail")
                 else '<div class="muted">no preview</div>')
        if m.get("overlay"):
            image = (f'<div class="pair">{image}<img alt="Grad-CAM of {escape(m["predicted_label"])}" '
                     f'title="Grad-CAM: where the model found {escape(m["predicted_label"])}" '
                     f'src="data:image/png;base64,{m["overlay"]}"></div>')
        figures.append(
            f'<figure title="{escape(m["path"])}">{image}<figcaption>true <b>{escape(m["true_label"])}</b>, '
            f'said <b>{escape(m["predicted_label"])}</b> at {_pct(m["confidence"])}</figcaption></figure>'
        )
    return f'<div class="gallery">{"".join(figures)}</div>'


def _set_section(result: dict[str, Any], comparison: dict[str, Any], mistakes: list[dict[str, Any]]) -> str:
    matrix = result["confusion_matrix"]
    heatmap = confusion_heatmap(matrix["normalized"], matrix["counts"], result["labels"])
    reliability = reliability_diagram(result["reliability"])
    return (
        f"<h2>{escape(result['name'])} <small class='muted'>{escape(result['input'])}</small></h2>"
        f"{_headline(result, comparison)}{_notes(result)}"
        f"<h3>Per class</h3>{_per_class_table(result)}"
        f'<div class="figs"><figure><img alt="confusion matrix" src="data:image/png;base64,{heatmap}">'
        f"<figcaption>Confusion matrix (row-normalised; numbers are counts)</figcaption></figure>"
        f'<figure><img alt="reliability diagram" src="data:image/png;base64,{reliability}">'
        f"<figcaption>Reliability diagram</figcaption></figure></div>"
        f"<h3>Most confident mistakes <small class='muted'>(the crop the model saw"
        f"{', and beside it Grad-CAM of the class it said' if any(m.get('overlay') for m in mistakes) else ''})"
        f"</small></h3>"
        f"{_gallery(mistakes)}"
    )


def render_html(report: dict[str, Any], mistakes: dict[str, list[dict[str, Any]]]) -> str:
    """The page for `report` (report.json's content); `mistakes` maps a set to rows with thumbnails."""
    gate = report["gate"]
    if gate["passed"]:
        banner = '<p class="gate pass">Gate passed: no drop beyond the tolerance.</p>'
    else:
        lines = "".join(f"<li>{escape(f['message'])}</li>" for f in gate["failures"])
        banner = f'<div class="gate fail">Gate failed:<ul>{lines}</ul></div>'
    model, run = report["model"], report["run"]
    sections = "".join(_set_section(r, report["comparison"], mistakes.get(name, []))
                       for name, r in report["sets"].items())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Evaluation {escape(run['id'])}</title><style>{_STYLE}</style></head><body>"
        f"<h1>Evaluation of {escape(model['name'] or model['arch'])}</h1>"
        f"<p class='muted'>run {escape(run['id'])}, finished {escape(run['finished'])} · model "
        f"{escape(model['uri'])} (sha256 {escape(model['sha256'][:12])}, {model['bytes']} bytes)</p>"
        f"{banner}{sections}</body></html>"
    )
