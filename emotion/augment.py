"""Batch augmentation for face training, run on the training device as tensor ops.

Only changes that keep the expression: small shifts, rotations and scale, mirroring, and mild
photometric noise. Anything stronger (large crops, vertical flips) destroys the cue we learn.
"""

import math

import torch
import torch.nn.functional as F


def augment_faces(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    max_rotation_deg: float = 12.0,
    max_shift: float = 0.1,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Randomly transform a normalised N x C x H x W batch, each image independently."""
    n, device = x.shape[0], x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).to(device) * (high - low) + low

    angle = uniform(-max_rotation_deg, max_rotation_deg) * math.pi / 180
    scale = uniform(*scale_range)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(-max_shift, max_shift) * 2], dim=1),
            torch.stack([sin * flip, cos, uniform(-max_shift, max_shift) * 2], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    contrast = uniform(0.8, 1.2).view(n, 1, 1, 1)
    brightness = uniform(-0.2, 0.2).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness

    blur = (uniform(0, 1) < 0.15).view(n, 1, 1, 1)
    channels = out.shape[1]
    kernel = torch.tensor([1.0, 2.0, 1.0], device=device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(channels, 1, 3, 3)
    blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)
    out = torch.where(blur, blurred, out)

    noise = torch.randn(out.shape, generator=generator).to(device)
    return out + noise * uniform(0, 0.05).view(n, 1, 1, 1)
