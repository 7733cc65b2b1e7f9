"""The training loop run by each Ray Train worker.

Batches are augmented as tensor ops on the worker's own device, from arrays decoded once
(`emotion.training.data`): no per-image Python in the hot loop, and the same code runs on one CPU
or on a node of GPUs.
"""

import csv
import io
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report, f1_score

from emotion.calibration import calibration_error, fit_temperature
from emotion.checkpoint import new_checkpoint, save_checkpoint
from emotion.flip import flip_averaged_logits
from emotion.labels import LABELS
from emotion.models import build_model
from emotion.precision import autocast, resolve_precision
from emotion.preprocess import normalize
from emotion.training import tracking
from emotion.training.augment import augment_faces
from emotion.training.config import RunOptions, TrainConfig, recipe_changes
from emotion.training.data import class_weights, split_data
from emotion.training.distill import Distillation, Teacher, load_teacher
from emotion.training.mixing import Mixing, mix_batch, mixed_cross_entropy
from emotion.uris import portable_name

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "model.pt"
STATE_FILE = "state.pt"
CSV_COLUMNS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds"
)


@dataclass
class Progress:
    """What a resumed run needs besides the weights: where it stopped and what it has kept."""

    epoch: int = 0
    best_f1: float = -1.0
    stale: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_model: bytes = b""
    mlflow_run_id: str | None = None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, batch_size: int = 512
) -> tuple[float, np.ndarray]:
    """Mean loss and flip-averaged logits (N x classes, on the CPU), exactly as Predictor computes
    them."""
    model.eval()
    losses, outputs = [], []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with autocast(precision, xb.device):
            logits = flip_averaged_logits(model, xb)
        losses.append(F.cross_entropy(logits, yb, reduction="sum").item())
        outputs.append(logits.float().cpu().numpy())
    return sum(losses) / len(x), np.concatenate(outputs)


def calibration(logits: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The temperature fitted on validation logits, and the expected calibration error of the
    validation probabilities before and after it."""
    temperature = fit_temperature(logits, truth)
    return {
        "temperature": temperature,
        "val_ece": calibration_error(logits, truth, temperature),
        "val_ece_uncalibrated": calibration_error(logits, truth, 1.0),
    }


def write_metrics_csv(history: list[dict[str, float]], uri: str) -> None:
    """Write one line per finished epoch to `uri` (local or s3://), replacing what was there."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    with fsspec.open(uri, "w") as f:
        f.write(text.getvalue())


def recorded_recipe(run_uri: str) -> dict[str, Any] | None:
    """The recipe stored with a run's latest checkpoint (`run_uri`: an absolute local path or an
    s3:// URI, as Ray Train takes it), None before its first one.

    Read in the driver, so that a resume under another recipe is refused before any worker starts:
    a different schedule length or learning rate would silently train something neither run
    describes.
    """
    ray_train_log = logging.getLogger("ray.train")
    level = ray_train_log.level
    # Ray Train announces the snapshot it finds, which it does again when the run resumes.
    ray_train_log.setLevel(logging.WARNING)
    try:
        checkpoint = ray.train.Result.from_path(run_uri).checkpoint
    except RuntimeError:
        # The folder of a run stopped before its first checkpoint: it starts afresh.
        return None
    finally:
        ray_train_log.setLevel(level)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)["recipe"]


def _restore(
    cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
) -> Progress:
    """Load the latest Ray Train checkpoint of this run into the objects given, if there is one.

    The driver refused a changed recipe before the run started (`recorded_recipe`), but from the
    checkpoint it read then: the recipe is checked again in the state actually loaded, so that a
    checkpoint written in between by another run of the same name is never continued under `cfg`.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        best_model = (Path(folder) / CHECKPOINT_FILE).read_bytes()
    changed = recipe_changes(state["recipe"], cfg)
    if changed:
        raise ValueError(f"the checkpoint to resume was recorded under another recipe: {', '.join(changed)} changed")
    net = model.module if hasattr(model, "module") else model
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(
        state["epoch"], state["best_f1"], state["stale"], state["history"], best_model, state.get("mlflow_run_id")
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: trains, validates and checkpoints every epoch, resuming if it can.

    `config` holds the recipe (`TrainConfig`) under "recipe" and `RunOptions` under "run". Each
    epoch's checkpoint holds the training state (weights, optimizer, schedule, random generators,
    metrics so far) and the best model so far as a finished checkpoint file, so the latest
    checkpoint is both where a resumed run starts and what the run delivers.
    """
    cfg, options = TrainConfig(**config["recipe"]), RunOptions(**config["run"])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(int(cpus), 1))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)

    train, val = split_data(cfg)
    mean = tuple(float(v) for v in train.pixels.mean(axis=(0, 1, 2)) / 255)
    std = tuple(float(v) for v in train.pixels.std(axis=(0, 1, 2)) / 255)
    x_train = torch.from_numpy(normalize(train.pixels, mean, std))
    y_train = torch.from_numpy(train.targets)
    x_val = torch.from_numpy(normalize(val.pixels, mean, std)).to(device)
    x_val = x_val.contiguous(memory_format=torch.channels_last)
    y_val = torch.from_numpy(val.targets).to(device)

    model = build_model(cfg.arch, len(LABELS), cfg.channels, **cfg.arch_kwargs)
    model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    weights = class_weights(train.targets, cfg.class_weight_power).to(device)
    distillation = Distillation.from_setting(cfg.distillation) if cfg.distillation is not None else None
    teacher = None
    if distillation is not None:
        teacher = Teacher(distillation, load_teacher(distillation)[0], device, mean, std, cfg.input_size)
    mixing = Mixing.from_setting(cfg.mixing) if cfg.mixing is not None else None
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )
    per_worker = len(y_train) // world
    steps = max(per_worker // cfg.batch_size, 1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=cfg.warmup_fraction
    )
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    progress = _restore(cfg, model, optimizer, scheduler, generator)
    if rank == 0:
        log.info(
            "training %s on %d images (%d validation), %d worker(s), %s, %s",
            cfg.arch, len(y_train), len(y_val), world, device, precision,
        )
        if progress.epoch:
            log.info("resuming after epoch %d of %d", progress.epoch, cfg.epochs)
    tracked = rank == 0 and options.mlflow_uri is not None
    if tracked:
        progress.mlflow_run_id = tracking.start_run(
            options.mlflow_uri, options.mlflow_experiment, cfg.name, asdict(cfg), progress.mlflow_run_id
        )

    last = cfg.epochs
    if options.epochs_this_run is not None:
        last = min(last, progress.epoch + options.epochs_this_run)
    while progress.epoch < last and progress.stale < cfg.patience:
        epoch = progress.epoch + 1
        model.train()
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        mine = order[rank::world][: steps * cfg.batch_size]
        started, total_loss, correct = time.perf_counter(), 0.0, 0
        for step in range(steps):
            idx = mine[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb = augment_faces(x_train[idx].to(device), generator, **cfg.augmentation)
            partner, lam = None, 1.0
            if mixing is not None:
                xb, partner, lam = mix_batch(xb, generator, mixing)
            xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y_train[idx].to(device)
            with autocast(precision, device):
                logits = model(xb)
            loss = mixed_cross_entropy(
                logits.float(), yb, partner, lam, weight=weights, label_smoothing=cfg.label_smoothing
            )
            if teacher is not None:
                with autocast(precision, device):
                    taught = teacher.logits(xb)
                loss = teacher.blend(loss, logits.float(), taught)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            hits = logits.argmax(1) == yb
            if lam != 1.0:
                # A blended face counts as right in the measure its label weighs.
                hits = lam * hits + (1 - lam) * (logits.argmax(1) == yb[partner])
            correct += hits.sum().item()
        seconds = time.perf_counter() - started
        val_loss, val_logits = evaluate(model, x_val, y_val, precision)
        val_pred, truth = val_logits.argmax(axis=1), val.targets
        metrics = {
            "epoch": epoch,
            "train_loss": total_loss / len(mine),
            "train_accuracy": correct / len(mine),
            "val_loss": val_loss,
            "val_accuracy": float((val_pred == truth).mean()),
            "val_macro_f1": float(f1_score(truth, val_pred, average="macro")),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_s": len(mine) * world / seconds,
        }
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  val_macro_f1 %.4f  lr %.4f  %.0f img/s",
                epoch, cfg.epochs, metrics["train_loss"], metrics["train_accuracy"], val_loss,
                metrics["val_accuracy"], metrics["val_macro_f1"], metrics["lr"], metrics["images_per_s"],
            )
        improved = metrics["val_macro_f1"] > progress.best_f1
        progress.epoch, progress.history = epoch, [*progress.history, metrics]
        progress.stale = 0 if improved else progress.stale + 1
        progress.best_f1 = max(progress.best_f1, metrics["val_macro_f1"])
        if progress.stale >= cfg.patience and rank == 0:
            log.info("early stop: val macro-F1 has not improved for %d epochs", progress.stale)
        if rank != 0:
            ray.train.report(metrics)
            continue
        if options.metrics_csv:
            write_metrics_csv(progress.history, options.metrics_csv)
        if tracked:
            tracking.log_epoch(metrics)
        net = model.module if hasattr(model, "module") else model
        state = {
            "recipe": asdict(cfg),
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": progress.epoch,
            "best_f1": progress.best_f1,
            "stale": progress.stale,
            "history": progress.history,
            "mlflow_run_id": progress.mlflow_run_id,
        }
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            best_file = Path(tmp) / CHECKPOINT_FILE
            if improved:
                validation = cfg.validation and portable_name(cfg.validation)
                calibrated = calibration(val_logits, truth)
                report = classification_report(
                    truth, val_pred, labels=range(len(LABELS)), target_names=list(LABELS),
                    output_dict=True, zero_division=0,
                )
                best = new_checkpoint(
                    net,
                    arch=cfg.arch,
                    arch_kwargs=cfg.arch_kwargs,
                    labels=LABELS,
                    input_size=cfg.input_size,
                    channels=cfg.channels,
                    mean=mean,
                    std=std,
                    name=cfg.name,
                    trained_on=f"{portable_name(cfg.train)} ({len(y_train)} images); selected on "
                    f"{validation or f'a stratified {cfg.val_fraction:.0%} split'} ({len(y_val)} images)"
                    + (f"; distilled from {portable_name(distillation.teacher)}" if distillation is not None else ""),
                    recipe=asdict(cfg) | {"train": portable_name(cfg.train), "validation": validation,
                                          "precision": precision, "workers": world,
                                          "distillation": None if distillation is None else asdict(distillation)
                                          | {"teacher": portable_name(distillation.teacher)}},
                    metrics={"validation": metrics | calibrated | {"per_class": report}},
                    test_time_flip=True,
                    temperature=calibrated["temperature"],
                )
                save_checkpoint(best, best_file)
                progress.best_model = best_file.read_bytes()
            else:
                best_file.write_bytes(progress.best_model)
            done = progress.epoch >= cfg.epochs or progress.stale >= cfg.patience
            ray.train.report(
                metrics | {"done": done, "mlflow_run_id": progress.mlflow_run_id or ""},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )
    if tracked:
        tracking.end_run()
