"""`python -m jobs.train`: train a model on a labelled image folder with Ray Train.

The same command trains on one CPU here and on several GPUs of a cluster (`--workers 4
--use-gpu`); the result is one self-describing checkpoint file.
"""

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

import fsspec
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from emotion.checkpoint import CheckpointError, load_checkpoint
from emotion.models import available_architectures
from emotion.training.augment import augment_faces, augmentation_settings
from emotion.training.config import RunOptions, TrainConfig, recipe_changes
from emotion.training.distill import Distillation, check_teacher, load_teacher
from emotion.training.loop import CHECKPOINT_FILE, recorded_recipe, train_loop_per_worker
from emotion.training.mixing import Mixing
from emotion.training.tracking import log_result
from emotion.uris import absolute_uri, filesystem
from jobs.conf import apply_defaults


def build_parser() -> argparse.ArgumentParser:
    """The command line, its defaults read from conf/train.yaml (the only place they are set)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__)
    parser.add_argument("--train", required=True, help="labelled folder (class sub-folders), local or s3://")
    parser.add_argument("--validation", help="labelled validation folder; default: a stratified split of --train")
    parser.add_argument("--output", required=True, help="checkpoint file to write, local or s3://")
    parser.add_argument("--arch", help="architecture name (emotion_cnn or a torchvision model)")
    parser.add_argument("--arch-kwargs", type=json.loads, help='JSON, e.g. \'{"image_size": 48}\'')
    parser.add_argument("--augmentation", type=json.loads,
                        help='JSON keywords of emotion.training.augment.augment_faces, e.g. \'{"warp_fraction": 0}\'')
    parser.add_argument("--distillation", type=json.loads,
                        help='JSON, e.g. \'{"teacher": "ensemble.pt", "weight": 0.5, "temperature": 2}\': '
                             "also learn from a trained model's softened outputs")
    parser.add_argument("--mixing", type=json.loads,
                        help='JSON, e.g. \'{"fraction": 0.5, "mixup_alpha": 0.2, "cutmix_alpha": 1.0}\': '
                             "train a share of batches on blends of two faces and their labels (mixup, CutMix)")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--channels", type=int, choices=(1, 3))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup-fraction", type=float, help="share of the one-cycle schedule spent raising the lr")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--class-weight-power", type=float)
    parser.add_argument("--patience", type=int)
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--limit-per-class", type=int, help="train on at most N images per class (smoke runs)")
    parser.add_argument("--keep-validation-copies", action=argparse.BooleanOptionalAction,
                        help="train on training images identical to validation images too")
    parser.add_argument("--workers", type=int, help="Ray Train workers (one per GPU on a GPU cluster)")
    parser.add_argument("--use-gpu", action=argparse.BooleanOptionalAction)
    parser.add_argument("--cpus-per-worker", type=float, help="default: all CPUs of the cluster shared out")
    parser.add_argument("--storage", help="Ray Train run storage, local (~ expanded) or s3://")
    parser.add_argument("--name", help="model name, and the run's folder under --storage")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction,
                        help="continue the run in --storage/--name from its last epoch, under the same recipe")
    parser.add_argument("--mlflow-uri", help="log the run to MLflow: a tracking server URL or a local folder")
    parser.add_argument("--mlflow-experiment", help="MLflow experiment the run is logged under")
    parser.add_argument("--epochs-this-run", type=int,
                        help="stop this invocation after N more epochs, leaving the run resumable")
    apply_defaults(parser, "train")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags, so a wrong folder or augmentation fails before Ray starts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.arch not in available_architectures():
        parser.error(f"--arch {args.arch!r} is not a known architecture")
    for flag in ("train", "validation"):
        uri = getattr(args, flag)
        if uri:
            fs, path = filesystem(uri)
            if not fs.isdir(path):
                parser.error(f"--{flag} {uri}: no such folder")
            setattr(args, flag, absolute_uri(uri))
    if args.input_size < 1:
        parser.error(f"--input-size {args.input_size}: must be a positive number of pixels")
    faces = torch.zeros(2, args.channels, args.input_size, args.input_size)
    try:
        args.augmentation = augmentation_settings(args.augmentation)
        # A tiny batch through the augmentation names a wrong value before any work starts.
        augment_faces(faces, torch.Generator(), **args.augmentation)
    except (TypeError, ValueError, RuntimeError) as exc:
        parser.error(f"--augmentation: {exc}")
    if args.distillation is not None:
        try:
            distillation = Distillation.from_setting(args.distillation)
            checkpoint, digest = load_teacher(distillation)
            check_teacher(checkpoint, args.input_size, args.channels)
        except (ValueError, OSError) as exc:
            parser.error(f"--distillation: {exc}")
        args.distillation = asdict(distillation) | {"teacher": absolute_uri(distillation.teacher), "sha256": digest}
    if args.mixing is not None:
        try:
            args.mixing = asdict(Mixing.from_setting(args.mixing))
        except ValueError as exc:
            parser.error(f"--mixing: {exc}")
    args.output, args.storage = absolute_uri(args.output), absolute_uri(os.path.expanduser(args.storage))
    if args.mlflow_uri and "://" not in args.mlflow_uri:
        # A local folder, given as a file URI: the workers' working directory is not the driver's.
        args.mlflow_uri = Path(args.mlflow_uri).expanduser().resolve().as_uri()
    return args


def metrics_csv_uri(output: str) -> str:
    """The per-epoch metrics file beside a checkpoint: `model.pt` -> `model.metrics.csv`."""
    stem = output[: -len(".pt")] if output.endswith(".pt") else output
    return f"{stem}.metrics.csv"


def main(argv: list[str] | None = None) -> int:
    """Train (or resume) the run and copy its best checkpoint to --output; exit 2 on bad flags."""
    args = parse_args(argv)
    run_uri = f"{args.storage.rstrip('/')}/{args.name}"
    fs, run_folder = filesystem(run_uri)
    if fs.exists(run_folder) and not args.resume:
        print(f"error: {run_folder} holds an earlier run: pass --resume to continue it, or another --name",
              file=sys.stderr)
        return 2
    if args.resume and not fs.exists(run_folder):
        print(f"error: --resume: no run in {run_folder}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Flags, YAML keys and TrainConfig fields share their names, so the config is read off them.
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    recorded = recorded_recipe(run_uri) if args.resume else None
    changed = recipe_changes(recorded, config) if recorded is not None else []
    if changed:
        print(f"error: --resume: cannot resume under a different recipe: {', '.join(changed)} changed",
              file=sys.stderr)
        return 2
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    cpus = args.cpus_per_worker or max(int(ray.cluster_resources().get("CPU", 1)) // args.workers, 1)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "recipe": asdict(config),
            "run": asdict(RunOptions(metrics_csv_uri(args.output), args.epochs_this_run, args.mlflow_uri,
                                     args.mlflow_experiment)),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.workers,
            use_gpu=args.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if args.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=args.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        print("error: training reported no checkpoint", file=sys.stderr)
        return 1
    with result.checkpoint.as_directory() as folder:
        source = Path(folder) / CHECKPOINT_FILE
        with source.open("rb") as src, fsspec.open(args.output, "wb") as dst:
            shutil.copyfileobj(src, dst)
    try:
        saved = load_checkpoint(args.output)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    best = saved.metrics["validation"]
    print(
        f"wrote {args.output}: epoch {best['epoch']}, val accuracy {best['val_accuracy']:.4f}, "
        f"macro-F1 {best['val_macro_f1']:.4f}, {saved.num_params} parameters, temperature {saved.temperature:.3f} "
        f"(expected calibration error {best['val_ece_uncalibrated']:.4f} -> {best['val_ece']:.4f}); "
        f"per-epoch metrics in {metrics_csv_uri(args.output)}"
    )
    if args.mlflow_uri and result.metrics.get("mlflow_run_id"):
        with result.checkpoint.as_directory() as folder:
            log_result(args.mlflow_uri, result.metrics["mlflow_run_id"], str(Path(folder) / CHECKPOINT_FILE), saved)
        print(f"logged to MLflow at {args.mlflow_uri}: run {result.metrics['mlflow_run_id']}")
    if not result.metrics.get("done", True):
        print(f"stopped after epoch {result.metrics['epoch']} of {config.epochs}: the same command with "
              f"--resume continues the run in {run_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
