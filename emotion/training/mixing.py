"""Mixup and CutMix: train on blends of two faces, with the same blend of their labels as target.

Mixup (Zhang et al., 2018) averages two whole faces; CutMix (Yun et al., 2019) pastes a rectangle
of one face into another, weighted by its area. Either keeps a network from answering with full
confidence from part of the evidence, which FER2013's noisy labels reward; both are per batch:
one weight and one pairing (a shuffle of the batch) for all its faces, as the papers apply them.
The weight `lam` of each face's own label is drawn from Beta(alpha, alpha).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emotion.training.config import finite_number

KEYS = ("fraction", "mixup_alpha", "cutmix_alpha")


@dataclass(frozen=True)
class Mixing:
    """A recipe's `mixing` setting: the share of batches mixed, and each method's Beta alpha (0:
    that method is off; when both are on, each mixed batch uses one of them at even odds)."""

    fraction: float
    mixup_alpha: float
    cutmix_alpha: float

    @classmethod
    def from_setting(cls, setting: dict[str, Any]) -> "Mixing":
        """The setting as given by `--mixing` or a stored recipe; ValueError says what is wrong."""
        if not isinstance(setting, dict) or set(setting) != set(KEYS):
            raise ValueError(f"expected a JSON object with the keys {', '.join(KEYS)}, not {setting!r}")
        fraction = setting["fraction"]
        if not finite_number(fraction) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1], not {fraction!r}")
        for key in ("mixup_alpha", "cutmix_alpha"):
            if not finite_number(setting[key]) or setting[key] < 0:
                raise ValueError(f"{key} must be a number >= 0, not {setting[key]!r}")
        if setting["mixup_alpha"] == setting["cutmix_alpha"] == 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: nothing would be mixed")
        return cls(float(fraction), float(setting["mixup_alpha"]), float(setting["cutmix_alpha"]))


def mix_batch(x: torch.Tensor, generator: torch.Generator, mixing: Mixing) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The batch to train on, each face's partner (an index into the batch) and `lam`, the weight
    of each face's own label; an unmixed batch comes back as it was, with `lam` 1.

    Every draw comes from `generator`, whose state a checkpoint keeps, so a resumed run mixes
    as an uninterrupted one would.
    """
    n = x.shape[0]
    unmixed = (x, torch.arange(n, device=x.device), 1.0)
    if torch.rand(1, generator=generator).item() >= mixing.fraction:
        return unmixed
    cutmix = mixing.mixup_alpha == 0 or (mixing.cutmix_alpha > 0 and torch.rand(1, generator=generator).item() < 0.5)
    alpha = mixing.cutmix_alpha if cutmix else mixing.mixup_alpha
    # torch's Beta sampler takes no generator; numpy's, seeded from it, keeps the draw reproducible.
    seed = int(torch.randint(2**62, (1,), generator=generator).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    partner = torch.randperm(n, generator=generator).to(x.device)
    if not cutmix:
        return lam * x + (1 - lam) * x[partner], partner, lam
    height, width = x.shape[-2:]
    side = np.sqrt(1 - lam)
    box_h, box_w = round(height * side), round(width * side)
    if box_h == 0 or box_w == 0:
        return unmixed
    top = int(torch.randint(height - box_h + 1, (1,), generator=generator).item())
    left = int(torch.randint(width - box_w + 1, (1,), generator=generator).item())
    out = x.clone()
    out[..., top : top + box_h, left : left + box_w] = x[partner][..., top : top + box_h, left : left + box_w]
    return out, partner, 1 - box_h * box_w / (height * width)


def mixed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, partner: torch.Tensor | None, lam: float, **kwargs: Any
) -> torch.Tensor:
    """Cross-entropy against the blend of each face's label and its partner's (`F.cross_entropy`
    keywords pass through: class weights, label smoothing)."""
    loss = F.cross_entropy(logits, targets, **kwargs)
    if lam == 1.0:
        return loss
    return lam * loss + (1 - lam) * F.cross_entropy(logits, targets[partner], **kwargs)
