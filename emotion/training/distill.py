"""Knowledge distillation: a student learns from a trained teacher's softened outputs as well as
from the labels.

An ensemble of networks is more accurate than any one of them and as many times slower; a single
student trained to match its outputs keeps much of the gain at one network's cost. The teacher
sees each augmented batch the student sees, and the loss is

    (1 - weight) * cross-entropy(labels) + weight * T^2 * KL(teacher_T || student_T)

where `_T` is the softmax at temperature T: a higher T exposes how the teacher ranks the wrong
classes (a sad face that looks half fearful), which is what the labels cannot teach. The T^2
keeps the term's gradients on the scale of the cross-entropy's as T changes.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from emotion.checkpoint import Checkpoint, load_checkpoint_file
from emotion.labels import LABELS
from emotion.models import Ensemble
from emotion.training.config import finite_number

KEYS = ("teacher", "weight", "temperature")
# Recorded by jobs.train when a run starts, or given to insist on one file.
OPTIONAL_KEYS = ("sha256",)


@dataclass(frozen=True)
class Distillation:
    """A recipe's `distillation` setting: the teacher checkpoint and how much to heed it."""

    teacher: str
    weight: float
    temperature: float
    # The teacher file's sha256: a resumed run taught by another file at the same path would
    # train something its recipe does not describe.
    sha256: str | None = None

    @classmethod
    def from_setting(cls, setting: dict[str, Any]) -> "Distillation":
        """The setting as given by `--distillation` or a stored recipe; ValueError says what is wrong."""
        if not isinstance(setting, dict) or not set(KEYS) <= set(setting) <= set(KEYS + OPTIONAL_KEYS):
            raise ValueError(f"expected a JSON object with the keys {', '.join(KEYS)} (and optionally "
                             f"{', '.join(OPTIONAL_KEYS)})")
        weight, temperature = setting["weight"], setting["temperature"]
        if not finite_number(weight) or not 0 < weight <= 1:
            raise ValueError(f"weight must be a number in (0, 1], not {weight!r}")
        if not finite_number(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a positive finite number, not {temperature!r}")
        sha256 = setting.get("sha256")
        if sha256 is not None and not isinstance(sha256, str):
            raise ValueError(f"sha256 must be a hex string, not {sha256!r}")
        return cls(str(setting["teacher"]), float(weight), float(temperature), sha256)


def load_teacher(setting: Distillation) -> tuple[Checkpoint, str]:
    """The teacher's checkpoint and the sha256 of the bytes it was loaded from, refused when they
    are not the file the setting records."""
    checkpoint, digest, _ = load_checkpoint_file(setting.teacher)
    if setting.sha256 is not None and digest != setting.sha256.lower():
        raise ValueError(f"{setting.teacher} is not the teacher this run was given: its sha256 is "
                         f"{digest[:12]}, not {setting.sha256[:12]}")
    return checkpoint, digest


def check_teacher(checkpoint: Checkpoint, input_size: int, channels: int) -> None:
    """Refuse a teacher whose outputs or inputs are not the student's: its answers would be
    compared class by class, on the same batches."""
    if tuple(checkpoint.labels) != tuple(LABELS):
        raise ValueError(f"teacher labels {list(checkpoint.labels)} are not the model's {list(LABELS)}")
    if (checkpoint.input_size, checkpoint.channels) != (input_size, channels):
        raise ValueError(f"teacher takes {checkpoint.channels}x{checkpoint.input_size}x{checkpoint.input_size}, "
                         f"the student {channels}x{input_size}x{input_size}")


class Teacher:
    """A trained checkpoint, any architecture or an ensemble, run in eval mode beside the student.

    The student's inputs are normalised with its own training set's mean and std; the teacher's
    were normalised with the ones stored in its checkpoint, so each batch is mapped back to the
    teacher's scale before it sees it.
    """

    def __init__(self, setting: Distillation, checkpoint: Checkpoint, device: torch.device,
                 mean: tuple[float, ...], std: tuple[float, ...], input_size: int) -> None:
        check_teacher(checkpoint, input_size, len(mean))
        self.setting = setting
        self.network = checkpoint.build().eval().to(device, memory_format=torch.channels_last)
        if isinstance(self.network, Ensemble):
            # A cascade saves time where answers are served; a teacher's cost is paid once, in
            # training, and every face learns from every member.
            self.network.cascade_margin = None
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

        def per_channel(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, device=device).view(1, -1, 1, 1)

        teacher_mean, teacher_std = per_channel(list(checkpoint.mean)), per_channel(list(checkpoint.std))
        self.scale = per_channel(list(std)) / teacher_std
        self.shift = (per_channel(list(mean)) - teacher_mean) / teacher_std

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (an ensemble's mean log-probabilities, a cascade's over every
        member on every face) for a student-normalised batch."""
        return self.network(x * self.scale.to(x.dtype) + self.shift.to(x.dtype)).float()

    def blend(self, label_loss: torch.Tensor, student: torch.Tensor, taught: torch.Tensor) -> torch.Tensor:
        """The training loss: the labels' loss and the distillation term, weighted by the setting."""
        weight = self.setting.weight
        return (1 - weight) * label_loss + weight * distillation_loss(student, taught, self.setting.temperature)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    log_target=True, reduction="batchmean") * temperature**2
