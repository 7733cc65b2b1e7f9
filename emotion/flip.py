"""Test-time flip averaging, spent only where it can change the answer.

Faces mean the same mirrored, so averaging the logits of an image and its mirror adds validation
accuracy. A second forward pass for every image doubles the cost, but it can only change the
predicted class where the first pass is unsure: mirroring only the images whose top two
probabilities lie within a margin of each other gives nearly the accuracy of mirroring all of them
for a fraction of the cost (figures in docs/model-card.md and docs/benchmarks.md).
"""

from collections.abc import Callable

import torch

# Top-1 minus top-2 probability under which an image also goes through the network mirrored.
FLIP_MARGIN = 0.2


def flip_averaged_logits(
    model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, margin: float = FLIP_MARGIN
) -> torch.Tensor:
    """float32 logits of an N x C x H x W batch, averaged with its mirror where the model is unsure.

    `margin` 0 never mirrors; 1 or more mirrors every image. Whether an image is mirrored depends
    on its own first pass alone, never on the rest of its batch.
    """
    logits = model(batch.contiguous(memory_format=torch.channels_last)).float()
    if margin <= 0:
        return logits
    if margin >= 1:
        unsure = torch.arange(len(batch), device=batch.device)
    else:
        top2 = torch.softmax(logits, dim=1).topk(2, dim=1).values
        unsure = torch.nonzero(top2[:, 0] - top2[:, 1] < margin).squeeze(1)
    if len(unsure):
        mirrored = torch.flip(batch[unsure], dims=[3]).contiguous(memory_format=torch.channels_last)
        logits[unsure] = (logits[unsure] + model(mirrored).float()) / 2
    return logits
