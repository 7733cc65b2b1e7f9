"""Batch augmentation for face training, run on the training device as tensor ops.

Only changes that keep the expression: mirroring and whole-pixel shifts for every image, a small
rotation and a scale of up to 20% either way for a minority, and, when asked, mild photometric
changes, blur, noise and random erasing (a rectangle blanked, so that the network cannot lean on
one region of the face: the mouth alone, say, which a hand or a scarf hides in photos). Most
images are never resampled: bilinear resampling of every 48x48 training face blurs it, so the
network would learn on softer faces than it is evaluated on.
The defaults are the recipe of `conf/train.yaml`; docs/model-card.md has the runs behind it.
"""

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def augment_faces(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    max_shift_px: int = 4,
    warp_fraction: float = 0.3,
    max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.8, 1.2),
    photometric_fraction: float = 0.0,
    blur_fraction: float = 0.0,
    noise_fraction: float = 0.0,
    erase_fraction: float = 0.0,
    padding_mode: str = "border",
) -> torch.Tensor:
    """Randomly transform a normalised N x C x H x W batch, each image independently.

    Every image is mirrored at random and shifted by whole pixels; `warp_fraction` of them are
    also rotated and scaled, `photometric_fraction` get a contrast and brightness change,
    `blur_fraction` a light blur, `noise_fraction` Gaussian noise and `erase_fraction` a rectangle
    of 2-33% of the image, of aspect 0.3-3.3, set to 0 (the training set's mean). Fractions of 0 leave only
    flips and shifts, the plain recipe ablations compare against (`jobs.train --augmentation`).
    `padding_mode` fills what a shift uncovers as `grid_sample` does: "border" repeats the edge
    pixels, "reflection" mirrors the face across its edge, "zeros" fills it with the training set's mean.
    """
    n, device = x.shape[0], x.device
    height, width = x.shape[-2:]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).to(device) * (high - low) + low

    def chance(p: float) -> torch.Tensor:
        return uniform(0, 1) < p

    def shift(size: int) -> torch.Tensor:
        pixels = torch.randint(-max_shift_px, max_shift_px + 1, (n,), generator=generator)
        return pixels.to(device, x.dtype) * 2 / size

    warped = chance(warp_fraction)
    angle = torch.where(warped, uniform(-max_rotation_deg, max_rotation_deg) * math.pi / 180, 0.0)
    scale = torch.where(warped, uniform(*scale_range), 1.0)
    flip = torch.where(chance(0.5), -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift(width)], dim=1),
            torch.stack([sin * flip, cos, shift(height)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)

    photometric = chance(photometric_fraction).view(n, 1, 1, 1)
    contrast = uniform(0.85, 1.15).view(n, 1, 1, 1)
    brightness = uniform(-0.15, 0.15).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = torch.where(photometric, (out - mean) * contrast + mean + brightness, out)

    blur = chance(blur_fraction).view(n, 1, 1, 1)
    channels = out.shape[1]
    kernel = torch.tensor([1.0, 2.0, 1.0], device=device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(channels, 1, 3, 3)
    blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)
    out = torch.where(blur, blurred, out)

    noise = torch.randn(out.shape, generator=generator).to(device)
    out = out + noise * torch.where(chance(noise_fraction), uniform(0, 0.05), 0.0).view(n, 1, 1, 1)
    return _erase(out, chance(erase_fraction), uniform)


def _erase(x: torch.Tensor, chosen: torch.Tensor, uniform: Callable[[float, float], torch.Tensor]) -> torch.Tensor:
    """Blank one rectangle in each chosen image, drawn as torchvision's RandomErasing draws it."""
    height, width = x.shape[-2:]
    area = uniform(0.02, 0.33) * height * width
    aspect = torch.exp(uniform(math.log(0.3), math.log(3.3)))
    box_h = torch.sqrt(area * aspect).round().clamp(1, height)
    box_w = torch.sqrt(area / aspect).round().clamp(1, width)
    top = (uniform(0, 1) * (height - box_h + 1)).floor()
    left = (uniform(0, 1) * (width - box_w + 1)).floor()
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1)))
    return x.masked_fill((inside & chosen.view(-1, 1, 1)).unsqueeze(1), 0.0)


def augmentation_settings(given: dict[str, Any]) -> dict[str, Any]:
    """Every keyword of `augment_faces`: the given ones over its defaults.

    A recipe records all of them, so a later change of a default cannot change what a recorded
    run did, and `--resume` compares the augmentation itself rather than how it was spelled.
    """
    if not isinstance(given, dict):
        raise ValueError(f"expected a JSON object of augment_faces keywords, not {given!r}")
    defaults = {
        name: list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
        for name, parameter in inspect.signature(augment_faces).parameters.items()
        if parameter.default is not inspect.Parameter.empty and name != "generator"
    }
    if unknown := sorted(set(given) - set(defaults)):
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(defaults)})")
    return defaults | given
