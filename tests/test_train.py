"""Real Ray Train runs of a few seconds: the checkpoint loads and predicts, and a run resumes."""

import csv
import json
import subprocess
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
from PIL import Image

from emotion.checkpoint import load_checkpoint
from emotion.labels import LABELS
from emotion.models import build_model
from emotion.predictor import Predictor
from emotion.training.augment import augment_faces, augmentation_settings
from emotion.training.config import EARLIER_AUGMENTATION, TrainConfig, recipe_changes
from emotion.training.data import class_weights, split_data
from emotion.training.loop import CHECKPOINT_FILE, CSV_COLUMNS, STATE_FILE, _restore, recorded_recipe, write_metrics_csv
from jobs import train as train_job
from jobs.conf import read_defaults
from jobs.train import metrics_csv_uri, parse_args
from tests.images import labelled_faces
from tests.services import run_job

FOLDERS = ["anger", "disgusted", "fearful", "happiness", "neutral", "sadness", "surprised", "contempt"]


def synthetic_faces(root, per_class: int = 12) -> None:
    """Class sub-folders named as public datasets name them, `contempt` (no model class) among them."""
    labelled_faces(root, FOLDERS, per_class)


MIXING = json.dumps({"fraction": 0.5, "mixup_alpha": 0.4, "cutmix_alpha": 1.0})


def tiny_run(folder, *extra: str) -> list[str]:
    """`jobs.train`'s arguments for tiny synthetic faces in `folder`/train and a tiny network, with
    mixing on, whose draws come from the checkpointed generator as the augmentation's do."""
    return ["--train", str(folder / "train"), "--output", str(folder / "model.pt"), "--batch-size", "16",
            "--val-fraction", "0.25", "--arch-kwargs", json.dumps({"widths": [8, 16], "depth": 2}),
            "--precision", "fp32", "--mixing", MIXING, "--epochs", "3", "--storage", str(folder / "runs"),
            "--name", "tiny", *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, job_env) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted run of three epochs: its folder and what the command printed. The smoke
    test reads its checkpoint; an interrupted run of the same recipe must match its epochs."""
    folder = tmp_path_factory.mktemp("straight")
    synthetic_faces(folder / "train")
    result = run_job("train", *tiny_run(folder), env=job_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, result


@pytest.mark.slow
def test_ray_train_writes_a_checkpoint_that_loads_and_predicts(straight):
    folder, result = straight
    output = folder / "model.pt"
    log = result.stdout + result.stderr
    assert "skipping classes the model has no label for: ['contempt']" in log
    assert "epoch 1/3" in log and "val_macro_f1" in log and "img/s" in log
    checkpoint = load_checkpoint(output)
    assert checkpoint.name == "tiny" and checkpoint.labels == LABELS
    assert checkpoint.recipe["epochs"] == 3 and checkpoint.num_params > 0
    assert 0 <= checkpoint.metrics["validation"]["val_accuracy"] <= 1
    assert set(checkpoint.metrics["validation"]["per_class"]) >= set(LABELS)
    assert "stratified 25% split" in checkpoint.trained_on
    assert checkpoint.temperature == checkpoint.metrics["validation"]["temperature"] > 0
    assert "temperature" in result.stdout and "expected calibration error" in result.stdout
    # The data is named by its last two path parts: the checkpoint holds nothing of this machine's layout.
    assert checkpoint.recipe["train"] == f"{folder.name}/train" and str(folder) not in checkpoint.trained_on
    probs = Predictor(output, device="cpu").predict_pixels(np.zeros((2, 48, 48, 1), np.uint8))
    assert probs.shape == (2, 7) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_an_interrupted_run_resumes_at_its_next_epoch_and_matches_an_uninterrupted_one(tmp_path, monkeypatch, refuse,
                                                                                      job_env, straight):
    """The two halves are logged to MLflow as one run, with the recipe, every epoch and the model.
    The refusals run `main` in this process: they end before Ray starts."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    synthetic_faces(tmp_path / "train")
    store = tmp_path / "mlruns"

    def flags(*extra: str) -> list[str]:
        return tiny_run(tmp_path, "--mlflow-uri", str(store), "--mlflow-experiment", tmp_path.name, *extra)

    def train(*extra: str) -> subprocess.CompletedProcess:
        return run_job("train", *flags(*extra), env=job_env)

    first = train("--epochs-this-run", "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stopped after epoch 1 of 3" in first.stdout
    metrics = tmp_path / "model.metrics.csv"
    assert [row["epoch"] for row in read_csv(metrics)] == ["1"]

    assert "pass --resume to continue it" in refuse(train_job.main, *flags())
    assert refuse(train_job.main, *flags("--lr", "0.1", "--resume")) == ("error: --resume: cannot resume under a "
                                                                         "different recipe: lr changed")

    resumed = train("--resume")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-6000:]
    assert "resuming after epoch 1 of 3" in log
    assert "epoch 1/3" not in log and "epoch 2/3" in log and "epoch 3/3" in log
    interrupted = read_csv(metrics)
    assert [row["epoch"] for row in interrupted] == ["1", "2", "3"]
    assert list(interrupted[0]) == list(CSV_COLUMNS)
    assert "logged to MLflow" in resumed.stdout
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(tmp_path.name).experiment_id])
    assert run.data.params["lr"] == str(read_defaults("train")["lr"]) and run.data.params["epochs"] == "3"
    assert json.loads(run.data.params["arch_kwargs"]) == {"widths": [8, 16], "depth": 2}
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(point.step for point in history) == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/model.pt", "model/model-card.md"}
    card = Path(client.download_artifacts(run.info.run_id, "model/model-card.md", str(tmp_path))).read_text()
    assert card.startswith("# Model card: tiny") and "| angry |" in card

    uninterrupted = read_csv(straight[0] / "model.metrics.csv")
    for a, b in zip(interrupted, uninterrupted, strict=True):
        for column in ("train_loss", "train_accuracy", "val_loss", "lr"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4), (a["epoch"], column)
    best = load_checkpoint(tmp_path / "model.pt").metrics["validation"]
    assert best["val_macro_f1"] == max(float(row["val_macro_f1"]) for row in interrupted)


def test_recipe_fields_take_the_yaml_defaults_through_their_flags(tmp_path):
    args = parse_args(["--train", str(tmp_path), "--output", str(tmp_path / "m.pt"), "--lr", "0.1"])
    recipe = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    defaults = read_defaults("train")
    assert recipe["lr"] == 0.1
    given = {"train", "output", "lr", "augmentation"}
    assert all(recipe[key] == value for key, value in defaults.items() if key in recipe and key not in given)
    assert recipe["augmentation"] == augmentation_settings(defaults["augmentation"])
    assert args.resume is False and args.epochs_this_run is None


def recipe(tmp_path, *flags: str) -> TrainConfig:
    args = parse_args(["--train", str(tmp_path / "train"), "--output", str(tmp_path / "m.pt"), *flags])
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


@pytest.mark.parametrize("keep", [False, True])
def test_training_copies_of_validation_images_are_dropped_unless_kept(tmp_path, keep):
    synthetic_faces(tmp_path / "train")
    rng = np.random.default_rng(1)
    for folder in FOLDERS[:7]:
        (tmp_path / "validation" / folder).mkdir(parents=True)
        pixels = rng.integers(0, 256, (48, 48), dtype=np.uint8)
        Image.fromarray(pixels, "L").save(tmp_path / "validation" / folder / "own.png")
    copies = [tmp_path / "train" / folder / "3.png" for folder in FOLDERS[:3]]
    for copy in copies:
        (tmp_path / "validation" / copy.parent.name / "copy.png").write_bytes(copy.read_bytes())
    flags = ["--validation", str(tmp_path / "validation")] + (["--keep-validation-copies"] if keep else [])
    train, val = split_data(recipe(tmp_path, *flags))
    assert len(val.targets) == 7 + 3
    assert len(train.targets) == 7 * 12 - (0 if keep else 3)
    assert len(set(train.digests) & set(val.digests)) == (3 if keep else 0)


def test_a_run_recorded_before_a_recipe_key_existed_resumes_as_what_it_did(tmp_path):
    (tmp_path / "train").mkdir()
    cfg = recipe(tmp_path)
    recorded = {k: v for k, v in asdict(cfg).items() if k != "keep_validation_copies"}
    assert recipe_changes(recorded, cfg) == []
    assert recipe_changes(recorded, recipe(tmp_path, "--keep-validation-copies")) == ["keep_validation_copies"]
    assert recipe_changes(recorded, recipe(tmp_path, "--lr", "0.1")) == ["lr"]


@pytest.mark.parametrize("recorded_lr", [None, 0.1])
def test_a_worker_resumes_only_a_checkpoint_recorded_under_its_recipe(tmp_path, monkeypatch, recorded_lr):
    """The driver's check read the run's latest checkpoint earlier; the worker checks what it loads."""
    (tmp_path / "train").mkdir()
    cfg = recipe(tmp_path)

    def training_objects():
        model = build_model(cfg.arch, len(LABELS), cfg.channels, **cfg.arch_kwargs)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=10)
        return model, optimizer, scheduler, torch.Generator().manual_seed(7)

    model, optimizer, scheduler, generator = training_objects()
    (tmp_path / "snapshot").mkdir()
    torch.save({
        "recipe": asdict(cfg) | ({"lr": recorded_lr} if recorded_lr else {}),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
        "epoch": 3, "best_f1": 0.4, "stale": 1, "history": [{"epoch": 3}], "mlflow_run_id": None,
    }, tmp_path / "snapshot" / STATE_FILE)
    (tmp_path / "snapshot" / CHECKPOINT_FILE).write_bytes(b"best so far")
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: ray.train.Checkpoint.from_directory(str(tmp_path / "snapshot")))
    fresh = training_objects()
    if recorded_lr:
        with pytest.raises(ValueError, match="recorded under another recipe: lr changed"):
            _restore(cfg, *fresh)
        return
    progress = _restore(cfg, *fresh)
    assert (progress.epoch, progress.best_f1, progress.stale, progress.best_model) == (3, 0.4, 1, b"best so far")
    restored = fresh[0].state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored, strict=True))


def test_the_recipe_records_every_augmentation_keyword(tmp_path):
    (tmp_path / "train").mkdir()
    cfg = recipe(tmp_path, "--augmentation", '{"padding_mode": "reflection"}')
    assert cfg.augmentation == EARLIER_AUGMENTATION | {
        "scale_range": [0.8, 1.2], "photometric_fraction": 0.0, "blur_fraction": 0.0, "noise_fraction": 0.0,
        "padding_mode": "reflection"}


def test_a_run_recorded_with_only_the_augmentation_keywords_given_resumes_as_what_it_did(tmp_path):
    """Before recipes held every keyword, a left-out one meant augment_faces' default of the time."""
    (tmp_path / "train").mkdir()
    plain = {"scale_range": [0.8, 1.2], "photometric_fraction": 0, "blur_fraction": 0, "noise_fraction": 0}
    cfg = recipe(tmp_path, "--augmentation", json.dumps(plain))
    assert recipe_changes(asdict(cfg) | {"augmentation": plain}, cfg) == []
    assert recipe_changes(asdict(cfg) | {"augmentation": {}}, cfg) == ["augmentation"]
    earlier = {"scale_range": [0.92, 1.08], "photometric_fraction": 0.5, "blur_fraction": 0.05, "noise_fraction": 0.2}
    spelled_out = recipe(tmp_path, "--augmentation", json.dumps(earlier))
    assert recipe_changes(asdict(spelled_out) | {"augmentation": {}}, spelled_out) == []


@pytest.mark.parametrize(("setting", "reason"), [
    ('{"padding_mode": "mirror"}', "expected padding_mode to be 'zeros', 'border', or 'reflection'"),
    ('{"scale_rang": [0.8, 1.2]}', "unknown key 'scale_rang' (known: max_shift_px, warp_fraction,"),
    ('[0.8, 1.2]', "expected a JSON object of augment_faces keywords, not [0.8, 1.2]"),
])
def test_a_bad_augmentation_is_refused_before_any_work(tmp_path, capsys, setting, reason):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--train", str(tmp_path), "--output", str(tmp_path / "m.pt"), "--augmentation", setting])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--augmentation: " in err and reason in err


def test_metrics_csv_sits_beside_the_checkpoint():
    assert metrics_csv_uri("s3://bucket/models/v2.pt") == "s3://bucket/models/v2.metrics.csv"
    assert metrics_csv_uri("/runs/model") == "/runs/model.metrics.csv"


def test_metrics_csv_is_rewritten_not_appended(tmp_path):
    path = str(tmp_path / "m.csv")
    epoch = {"epoch": 1, "train_loss": 1.5, "train_accuracy": 0.4, "val_loss": 1.4, "val_accuracy": 0.45,
             "val_macro_f1": 0.3, "lr": 0.01, "seconds": 2.0, "images_per_s": 100.0}
    write_metrics_csv([epoch], path)
    write_metrics_csv([epoch, epoch | {"epoch": 2, "lr": 0.02}], path)
    rows = read_csv(path)
    assert [(row["epoch"], row["lr"]) for row in rows] == [("1", "0.01"), ("2", "0.02")]
    assert list(rows[0]) == list(CSV_COLUMNS)


def test_class_weights_lift_rare_classes():
    targets = np.asarray([0] * 90 + [1] * 10)
    half, full = class_weights(targets, 0.5), class_weights(targets, 1.0)
    assert half[1] / half[0] == pytest.approx(3.0)
    assert full[1] / full[0] == pytest.approx(9.0)
    assert torch.all(half[2:] == 0)


def test_augmentation_keeps_shape_and_varies_per_image():
    x = torch.randn(8, 1, 48, 48)
    out = augment_faces(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.allclose(out[0], out[1] - (x[1] - x[0]))
    assert (out - x).abs().mean() > 0.05


@pytest.mark.parametrize(("warp_fraction", "low", "high"), [(None, 0.6, 0.8), (0.0, 1.0, 1.0)])
def test_by_default_30_percent_of_faces_are_warped_and_none_recoloured(warp_fraction, low, high):
    """A default face that is not warped equals its input shifted and perhaps mirrored, exactly."""
    x = torch.randn(200, 1, 48, 48)
    settings = {} if warp_fraction is None else {"warp_fraction": warp_fraction}
    out = augment_faces(x, torch.Generator().manual_seed(0), **settings)
    exact = sum(
        any(torch.allclose(torch.roll(source, (dy, dx), (0, 1))[8:40, 8:40], augmented[8:40, 8:40], atol=1e-5)
            for source in (image, image.flip(-1)) for dy in range(-4, 5) for dx in range(-4, 5))
        for image, augmented in zip(x[:, 0], out[:, 0], strict=True)
    )
    assert low <= exact / len(x) <= high


def test_unwarped_faces_are_shifted_and_mirrored_without_resampling():
    """Flips and whole-pixel shifts must not blur: about 0.7 x 0.5 x 0.8 x 0.95 = 27% of faces get
    no warp, photometric change, noise or blur, and those must equal a shifted input exactly."""
    x = torch.randn(256, 1, 48, 48)
    mixed = {"photometric_fraction": 0.5, "blur_fraction": 0.05, "noise_fraction": 0.2}
    out = augment_faces(x, torch.Generator().manual_seed(0), **mixed)
    exact = 0
    for image, augmented in zip(x[:, 0], out[:, 0], strict=True):
        candidates = (
            torch.roll(source, (dy, dx), (0, 1))[8:40, 8:40]
            for source in (image, image.flip(-1))
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        )
        exact += any(torch.allclose(c, augmented[8:40, 8:40], atol=1e-5) for c in candidates)
    assert 0.15 < exact / len(x) < 0.5


@pytest.mark.parametrize(("erase_fraction", "low", "high"), [(1.0, 1.0, 1.0), (0.5, 0.35, 0.65), (0.0, 0.0, 0.0)])
def test_erasing_blanks_one_rectangle_in_the_chosen_faces(erase_fraction, low, high):
    """Inputs above 0 everywhere: the zeros an erased face holds are exactly one filled rectangle."""
    x = torch.rand(128, 1, 48, 48) + 1
    plain = {"warp_fraction": 0, "photometric_fraction": 0, "blur_fraction": 0, "noise_fraction": 0}
    out = augment_faces(x, torch.Generator().manual_seed(0), erase_fraction=erase_fraction, **plain)
    erased = 0
    for image in out[:, 0]:
        rows, cols = torch.nonzero(image == 0, as_tuple=True)
        if len(rows) == 0:
            continue
        erased += 1
        box = image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert torch.all(box == 0) and (image > 0).sum() == image.numel() - box.numel()
        assert 0.02 * 48 * 48 - 48 <= box.numel() <= 0.33 * 48 * 48 + 48
    assert low <= erased / len(x) <= high


def test_plain_augmentation_only_shifts_and_mirrors():
    x = torch.randn(64, 1, 48, 48)
    plain = {"warp_fraction": 0, "photometric_fraction": 0, "blur_fraction": 0, "noise_fraction": 0}
    out = augment_faces(x, torch.Generator().manual_seed(0), **plain)
    for image, augmented in zip(x[:, 0], out[:, 0], strict=True):
        assert any(
            torch.allclose(torch.roll(source, (dy, dx), (0, 1))[8:40, 8:40], augmented[8:40, 8:40], atol=1e-5)
            for source in (image, image.flip(-1))
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        )


@pytest.mark.parametrize(("padding_mode", "numpy_mode"), [("border", "edge"), ("reflection", "symmetric")])
def test_shifts_fill_the_uncovered_edge_as_asked(padding_mode, numpy_mode):
    x = torch.randn(32, 1, 48, 48)
    plain = {"warp_fraction": 0, "photometric_fraction": 0, "blur_fraction": 0, "noise_fraction": 0}
    out = augment_faces(x, torch.Generator().manual_seed(0), padding_mode=padding_mode, **plain)
    shifted = 0
    for image, augmented in zip(x[:, 0].numpy(), out[:, 0].numpy(), strict=True):
        padded = [np.pad(source, 4, mode=numpy_mode) for source in (image, image[:, ::-1])]
        matches = [(dy, dx) for source in padded for dy in range(9) for dx in range(9)
                   if np.allclose(source[dy : dy + 48, dx : dx + 48], augmented, atol=1e-4)]
        assert matches, "the whole image, edges included, is a padded and shifted input"
        shifted += matches[0] != (4, 4)
    assert shifted > len(x) / 2


def test_a_run_folder_without_a_checkpoint_records_no_recipe(tmp_path):
    """Ray Train makes the run folder before the first epoch ends: such a run starts afresh."""
    (tmp_path / "run").mkdir()
    assert recorded_recipe(str(tmp_path / "run")) is None
