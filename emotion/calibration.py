"""Temperature scaling: one number that makes a trained network's probabilities mean what they say.

Networks trained with cross-entropy end up over- or under-confident by a roughly uniform factor
in their logits. Dividing the logits by a temperature fitted on held-out faces (Guo et al., "On
Calibration of Modern Neural Networks", ICML 2017) fixes that without changing any prediction:
the order of the classes, hence the predicted label and accuracy, stays the same.
"""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from emotion.checkpoint import Checkpoint
from emotion.evaluation.metrics import expected_calibration_error, reliability_bins
from emotion.predictor import Predictor

# Temperatures outside this range mean the logits carry no usable scale (e.g. a network that
# outputs a constant); the fit is clamped rather than allowed to run off.
TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of `targets` under
    softmax(`logits` / T), for N x C logits and N class ids.

    Fitted on log T, so the search stays positive and treats halving and doubling alike.
    """
    if len(logits) == 0:
        raise ValueError("cannot fit a temperature on no examples")
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    return float(np.clip(log_t.exp().item(), low, high))


def calibrate(predictor: Predictor, pixels: np.ndarray, targets: np.ndarray, batch_size: int = 512) -> Checkpoint:
    """`predictor`'s checkpoint with a temperature fitted on these labelled faces (N x H x W x C
    uint8 and N class ids), and the fit recorded in its metrics as `calibration`.

    The logits come from the Predictor itself (its precision, its test-time mirroring), so the
    temperature fits the probabilities users will read, not those of another code path.
    """
    chunks = [predictor.predict_logits(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    logits_np = torch.cat(chunks).numpy().astype(np.float64)
    temperature = fit_temperature(logits_np, targets)
    checkpoint = predictor.checkpoint
    record = {
        "temperature": temperature,
        "faces": len(targets),
        "ece": calibration_error(logits_np, targets, temperature),
        "ece_uncalibrated": calibration_error(logits_np, targets, 1.0),
    }
    return dataclasses.replace(
        checkpoint, temperature=temperature, metrics=checkpoint.metrics | {"calibration": record}
    )


def calibration_error(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Expected calibration error of softmax(`logits` / `temperature`) against `targets`, with the
    evaluation report's bins."""
    probs = torch.softmax(torch.as_tensor(logits) / temperature, dim=1).numpy()
    bins = reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == np.asarray(targets))
    return float(expected_calibration_error(bins))
