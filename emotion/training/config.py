"""What a training run trains (`TrainConfig`, stored in the checkpoint as its recipe) and how one
invocation runs it (`RunOptions`)."""

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the checkpoint as its recipe.

    No field has a default of its own: `jobs.train` fills every one from its flags, whose defaults
    are conf/train.yaml, so a default lives in one place.
    """

    train: str
    validation: str | None
    arch: str
    arch_kwargs: dict[str, Any]
    input_size: int
    channels: int
    epochs: int
    batch_size: int
    lr: float
    warmup_fraction: float
    weight_decay: float
    label_smoothing: float
    class_weight_power: float
    patience: int
    val_fraction: float
    precision: str
    seed: int
    limit_per_class: int | None
    keep_validation_copies: bool
    augmentation: dict[str, Any]
    # {"teacher", "weight", "temperature"} (emotion.training.distill) or None.
    distillation: dict[str, Any] | None
    # {"fraction", "mixup_alpha", "cutmix_alpha"} (emotion.training.mixing) or None.
    mixing: dict[str, Any] | None
    name: str


def finite_number(value: Any) -> bool:
    """A finite int or float, as a recipe's numbers must be: JSON gives NaN and Infinity as
    floats, and True as an int."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# Recipe keys added after runs were recorded without them, with the value that describes what
# those runs did, so that they still resume.
ADDED_KEYS: dict[str, Any] = {"distillation": None, "keep_validation_copies": False, "mixing": None}
# augment_faces' defaults when recipes recorded only the augmentation keywords given, and 0 for
# erase_fraction, added later: what the keywords a recorded run left out meant.
EARLIER_AUGMENTATION: dict[str, Any] = {
    "max_shift_px": 4, "warp_fraction": 0.3, "max_rotation_deg": 10.0, "scale_range": [0.92, 1.08],
    "photometric_fraction": 0.5, "blur_fraction": 0.05, "noise_fraction": 0.2, "erase_fraction": 0.0,
    "padding_mode": "border",
}


def recipe_changes(recorded: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Keys whose value in `cfg` differs from the recipe a run was recorded with."""
    recorded = ADDED_KEYS | recorded
    recorded["augmentation"] = EARLIER_AUGMENTATION | recorded.get("augmentation", {})
    return sorted(k for k, v in asdict(cfg).items() if recorded.get(k) != v)


@dataclass
class RunOptions:
    """How one invocation runs, as opposed to what it trains: never part of the stored recipe.

    `metrics_csv` is rewritten after every epoch from the checkpointed history, so a resumed run
    never repeats a line. `epochs_this_run` ends the invocation after that many epochs with the
    run still resumable, for sessions shorter than the schedule. With `mlflow_uri`, the rank-0
    worker logs the recipe and each epoch to MLflow (`emotion.training.tracking`).
    """

    metrics_csv: str | None
    epochs_this_run: int | None
    mlflow_uri: str | None
    mlflow_experiment: str
