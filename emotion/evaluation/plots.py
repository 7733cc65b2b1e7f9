"""Evaluation figures as base64 PNG, so the HTML report is one file that needs nothing else."""

import base64
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def _png_base64(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_heatmap(normalized: Sequence[Sequence[float] | None], counts: Sequence[Sequence[int]],
                      labels: Sequence[str]) -> str:
    """Row-normalised confusion matrix as a heatmap annotated with counts; empty rows stay blank."""
    matrix = np.array([row if row is not None else [np.nan] * len(labels) for row in normalized], dtype=float)
    figure, ax = plt.subplots(figsize=(5.5, 4.8))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (folder)")
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            if count:
                dark = not np.isnan(matrix[i, j]) and matrix[i, j] > 0.5
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    figure.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return _png_base64(figure)


def reliability_diagram(bins: Sequence[dict[str, Any]]) -> str:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with bin counts."""
    figure, (ax, hist) = plt.subplots(2, 1, figsize=(5, 5.2), sharex=True, height_ratios=(3, 1))
    lowers = [b["lower"] for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    filled = [b for b in bins if b["count"]]
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           color="#4c72b0", edgecolor="white", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    hist.bar(lowers, [b["count"] for b in bins], width=width, align="edge", color="#999999")
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence")
    hist.set_ylabel("images")
    return _png_base64(figure)
