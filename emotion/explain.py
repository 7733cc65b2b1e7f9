"""Grad-CAM heatmaps: where on the face the network looked when it chose a class.

Built on Captum's `LayerGradCam` (maintained with PyTorch, and a plain dependency with no native
code) rather than on hand-written hooks. Grad-CAM weighs a convolutional layer's feature maps by
the gradient of the chosen class's logit and keeps the positive part, upsampled to the input: it
needs the last layer that still has a spatial layout, which `target_layer` picks from the
architecture itself.

Explanations run on the trainable network in float32 (`Checkpoint.build`), not on the Predictor's
folded, low-precision one: gradients are what they need, and they are requested one face at a
time by a person, never in the batched path.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib import colormaps
from PIL import Image
from torch import nn

from emotion.checkpoint import Checkpoint
from emotion.models import EmotionCNN, Ensemble
from emotion.preprocess import normalize


def target_layer(model: nn.Module) -> tuple[nn.Module, bool]:
    """The layer Grad-CAM reads, and whether it reads that layer's input rather than its output.

    For `emotion_cnn`, the last feature map before the last pooling: the input of the last
    stage's pool, where the residual sum has been taken and the map is still twice as fine as
    after it. For any other architecture, the output of its last convolution in module order:
    the last spatial layer of a torchvision CNN's feature extractor.
    """
    if isinstance(model, EmotionCNN):
        return model.features[-1].pool, True
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        raise ValueError(f"{type(model).__name__} has no convolution for Grad-CAM to read")
    return convolutions[-1], False


def grad_cam(
    model: nn.Module, layer: nn.Module, batch: torch.Tensor, classes: list[int], layer_input: bool = False
) -> np.ndarray:
    """N x H x W heatmaps in [0, 1] (each scaled by its own maximum; all zero where nothing
    speaks for the class) of `classes[i]` for the i-th image of an N x C x H x W `batch`."""
    cam = LayerGradCam(model, layer)
    maps = cam.attribute(batch, target=classes, attribute_to_layer_input=layer_input, relu_attributions=True)
    maps = LayerAttribution.interpolate(maps.detach(), tuple(batch.shape[2:]), "bilinear")[:, 0]
    peak = maps.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
    return (maps / peak).clamp(0, 1).numpy().astype(np.float32)


class Explanation(NamedTuple):
    """One face's heatmap (H x W in [0, 1], at the model's input size) for class `target`."""

    heatmap: np.ndarray
    target: int


class Explainer:
    """Grad-CAM for one checkpoint: faces as the Predictor decodes them (N x H x W x C uint8) in,
    a heatmap per face out, for the class asked or, by default, the network's own top class."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.build().float().eval()
        # Captum hooks the target layer; an in-place ReLU after it would overwrite the very
        # output the hook holds.
        for module in self.model.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        # An ensemble is explained member by member, each at its own target layer, and the maps
        # of the members that weighed a face averaged: every member, or a sure cascade's first.
        self.parts = list(self.model.members) if isinstance(self.model, Ensemble) else [self.model]
        self.layers = [target_layer(part) for part in self.parts]

    def explain(self, pixels: np.ndarray, classes: list[int] | None = None) -> list[Explanation]:
        """Heatmaps for `pixels`; `classes` gives each face's class, else its top class."""
        ckpt = self.checkpoint
        batch = torch.from_numpy(normalize(pixels, ckpt.mean, ckpt.std))
        if classes is None:
            with torch.inference_mode():
                classes = self.model(batch).argmax(dim=1).tolist()
        maps = np.stack([
            grad_cam(part, layer, batch.clone().requires_grad_(), list(classes), layer_input)
            for part, (layer, layer_input) in zip(self.parts, self.layers, strict=True)
        ])
        # A cascade (`Ensemble.cascade_margin`) weighed the first member alone where it was sure.
        maps = np.where(self._escalated(batch)[:, None, None], maps.mean(axis=0), maps[0])
        peak = np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)
        return [Explanation(m, c) for m, c in zip(maps / peak, classes, strict=True)]

    @torch.inference_mode()
    def _escalated(self, batch: torch.Tensor) -> np.ndarray:
        """Which faces every member weighed: all of them, unless a cascade let the first decide."""
        if not isinstance(self.model, Ensemble):
            return np.ones(len(batch), dtype=bool)
        return self.model.escalated(torch.log_softmax(self.parts[0](batch), dim=1)).numpy()


def overlay(face: np.ndarray, heatmap: np.ndarray, side: int = 192, alpha: float = 0.45) -> Image.Image:
    """The face (H x W x C uint8) with its heatmap laid over it in the 'jet' colours, both enlarged
    to `side` pixels so a person can see it: red where the class was found."""
    base = Image.fromarray(face[:, :, 0] if face.shape[2] == 1 else face).convert("RGB")
    base = base.resize((side, side), Image.Resampling.BICUBIC)
    heat = Image.fromarray((heatmap * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    colours = (colormaps["jet"](np.asarray(heat) / 255.0)[:, :, :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(colours), alpha)


def png_bytes(image: Image.Image) -> bytes:
    """`image` as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
