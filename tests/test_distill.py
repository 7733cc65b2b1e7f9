"""Distillation: the loss, the teacher's view of a batch, the setting, and a real run that follows
its teacher."""

import dataclasses
import json
import subprocess
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from emotion.checkpoint import load_checkpoint, save_checkpoint
from emotion.labels import LABELS
from emotion.predictor import Predictor
from emotion.preprocess import normalize
from emotion.training.distill import Distillation, Teacher, distillation_loss, load_teacher
from jobs import train as train_job
from jobs.train import parse_args
from tests.conftest import file_sha256, splitting_margin, tiny_checkpoint
from tests.services import command_refusal, run_job
from tests.test_score_faces import always
from tests.test_train import synthetic_faces

SETTING = Distillation("teacher.pt", 0.5, 2.0)


def test_the_loss_is_t_squared_times_the_teachers_kl_divergence_from_the_student_per_face():
    teacher, student, t = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 1.0],
                                                                                          [1.0, 0.0, -2.0]]), 3.0
    p_teacher = torch.softmax(teacher / t, dim=1).numpy()
    p_student = torch.softmax(student / t, dim=1).numpy()
    by_hand = t**2 * np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(p_student)), axis=1))
    assert distillation_loss(student, teacher, t).item() == pytest.approx(by_hand, rel=1e-5)


def test_the_loss_is_zero_for_a_student_that_matches_and_grows_with_the_gap():
    teacher = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    assert distillation_loss(teacher.clone(), teacher, 2.0).item() == pytest.approx(0, abs=1e-6)
    near, far = teacher + torch.tensor([0.3, 0.0, 0.0]), teacher + torch.tensor([3.0, 0.0, 0.0])
    assert 0 < distillation_loss(near, teacher, 2.0) < distillation_loss(far, teacher, 2.0)
    # A constant added to every logit changes no probability.
    assert distillation_loss(teacher + 5.0, teacher, 2.0).item() == pytest.approx(0, abs=1e-5)


def test_the_teacher_sees_each_face_at_its_own_normalisation():
    """Student and teacher normalise with different mean and std; the teacher's logits for a
    student-normalised batch are the ones its network gives the same pixels normalised its way."""
    checkpoint = tiny_checkpoint(mean=(0.4,), std=(0.3,))
    pixels = np.random.default_rng(0).integers(0, 256, (5, 48, 48, 1), dtype=np.uint8)
    student_mean, student_std = (0.55,), (0.2,)
    teacher = Teacher(SETTING, checkpoint, torch.device("cpu"), student_mean, student_std, 48)
    got = teacher.logits(torch.from_numpy(normalize(pixels, student_mean, student_std)))
    own = checkpoint.build().eval()(torch.from_numpy(normalize(pixels, checkpoint.mean, checkpoint.std)))
    assert torch.allclose(got, own.detach(), atol=1e-4)
    assert not any(p.requires_grad for p in teacher.network.parameters())


def test_a_cascade_teaches_with_every_member_on_every_face():
    """A cascade saves time in serving; as a teacher every face learns from the whole ensemble."""
    from jobs.ensemble import join

    members = [tiny_checkpoint(seed=s) for s in range(2)]
    x = torch.from_numpy(normalize(np.random.default_rng(0).integers(0, 256, (16, 48, 48, 1), dtype=np.uint8),
                                   members[0].mean, members[0].std))
    cascade = join(members, cascade_margin=splitting_margin(members[0], x))
    teacher = Teacher(SETTING, cascade, torch.device("cpu"), members[0].mean, members[0].std, 48)
    with torch.inference_mode():
        whole, cascaded = join(members).build().eval()(x), cascade.build().eval()(x)
    assert torch.allclose(teacher.logits(x), whole, atol=1e-5)
    assert not torch.allclose(cascaded, whole, atol=1e-3)


def test_a_teacher_with_other_labels_or_inputs_is_refused():
    reordered = dataclasses.replace(tiny_checkpoint(), labels=tuple(reversed(LABELS)))
    with pytest.raises(ValueError, match="teacher labels"):
        Teacher(SETTING, reordered, torch.device("cpu"), (0.5,), (0.25,), 48)
    with pytest.raises(ValueError, match="teacher takes 1x48x48, the student 1x64x64"):
        Teacher(SETTING, tiny_checkpoint(), torch.device("cpu"), (0.5,), (0.25,), 64)


@pytest.mark.parametrize(("setting", "message"), [
    ({"teacher": "t.pt", "weight": 0.5}, "the keys teacher, weight, temperature (and optionally sha256)"),
    ({"teacher": "t.pt", "weight": 0.5, "temperature": 2, "seed": 1}, "the keys teacher, weight, temperature"),
    ({"teacher": "t.pt", "weight": 0.5, "temperature": 2, "sha256": 12}, "sha256 must be a hex string, not 12"),
    ({"teacher": "t.pt", "weight": 0, "temperature": 2}, "weight must be a number in (0, 1], not 0"),
    ({"teacher": "t.pt", "weight": 0.5, "temperature": -1}, "temperature must be a positive finite number, not -1"),
    ({"teacher": "t.pt", "weight": 0.5, "temperature": float("nan")}, "positive finite number, not nan"),
    ({"teacher": "t.pt", "weight": True, "temperature": 2}, "weight must be a number in (0, 1], not True"),
    ("t.pt", "expected a JSON object"),
])
def test_a_bad_setting_says_what_is_wrong(setting, message):
    with pytest.raises(ValueError) as error:
        Distillation.from_setting(setting)
    assert message in str(error.value)


def test_a_teacher_file_replaced_since_the_run_started_is_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    save_checkpoint(tiny_checkpoint(), path)
    setting = Distillation(str(path), 0.5, 2.0, file_sha256(path))
    checkpoint, digest = load_teacher(setting)
    assert (checkpoint.name, digest) == ("tiny", setting.sha256)
    save_checkpoint(tiny_checkpoint(seed=1), path)
    with pytest.raises(ValueError, match=f"{path} is not the teacher this run was given: its sha256 is "
                                         f"{file_sha256(path)[:12]}, not {setting.sha256[:12]}"):
        load_teacher(setting)


def test_the_job_records_the_teachers_sha256_in_the_recipe(tmp_path):
    synthetic_faces(tmp_path / "train", per_class=2)
    save_checkpoint(tiny_checkpoint(), tmp_path / "teacher.pt")
    setting = {"teacher": str(tmp_path / "teacher.pt"), "weight": 0.5, "temperature": 2}
    args = parse_args(["--train", str(tmp_path / "train"), "--output", str(tmp_path / "s.pt"),
                       "--distillation", json.dumps(setting)])
    digest = file_sha256(tmp_path / "teacher.pt")
    assert args.distillation == setting | {"weight": 0.5, "temperature": 2.0, "sha256": digest}
    given = parse_args(["--train", str(tmp_path / "train"), "--output", str(tmp_path / "s.pt"),
                        "--distillation", json.dumps(setting | {"sha256": digest.upper()})])
    assert given.distillation["sha256"] == digest


def student_flags(tmp_path, *extra: str) -> list[str]:
    return ["--train", str(tmp_path / "train"), "--output", str(tmp_path / "student.pt"), "--epochs", "4",
            "--batch-size", "16", "--lr", "0.02", "--arch-kwargs", json.dumps({"widths": [8, 16], "depth": 2}),
            "--val-fraction", "0.25", "--storage", str(tmp_path / "runs"), "--name", "student", *extra]


def train(tmp_path, env: Mapping[str, str], *extra: str) -> subprocess.CompletedProcess:
    return run_job("train", *student_flags(tmp_path, *extra), env=env)


def test_a_bad_distillation_flag_is_one_line_before_any_work(tmp_path, refuse):
    def refusal(*extra: str) -> str:
        return refuse(train_job.main, *student_flags(tmp_path, *extra), usage=True)

    synthetic_faces(tmp_path / "train", per_class=2)
    assert refusal("--distillation", json.dumps(
        {"teacher": str(tmp_path / "nope.pt"), "weight": 0.5, "temperature": 2})) == (
        f"python -m jobs.train: error: --distillation: {tmp_path / 'nope.pt'}: no such checkpoint file")
    assert not (tmp_path / "runs").exists()
    save_checkpoint(tiny_checkpoint(), tmp_path / "teacher.pt")
    assert refusal("--distillation", json.dumps(
        {"teacher": str(tmp_path / "teacher.pt"), "weight": 0.5, "temperature": 2, "sha256": "0" * 64})).startswith(
        f"python -m jobs.train: error: --distillation: {tmp_path / 'teacher.pt'} is not the teacher this run was "
        "given: its sha256 is ")
    assert refusal("--input-size", "64", "--distillation", json.dumps(
        {"teacher": str(tmp_path / "teacher.pt"), "weight": 0.5, "temperature": 2})) == (
        "python -m jobs.train: error: --distillation: teacher takes 1x48x48, the student 1x64x64")


@pytest.mark.slow
def test_a_student_taught_only_by_its_teacher_learns_the_teachers_answer(tmp_path, job_env):
    """With weight 1 the labels count for nothing: a teacher that answers "happy" to every face
    leaves a student that answers "happy" to the training faces of every class, where one taught
    by the labels tells them apart. Its run, resumed once the teacher file is replaced, is refused."""
    synthetic_faces(tmp_path / "train")
    save_checkpoint(always("happy"), tmp_path / "teacher.pt")
    setting = json.dumps({"teacher": str(tmp_path / "teacher.pt"), "weight": 1.0, "temperature": 2})
    result = train(tmp_path, job_env, "--distillation", setting)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    student = load_checkpoint(tmp_path / "student.pt")
    assert student.recipe["distillation"] == {"teacher": f"{tmp_path.name}/teacher.pt", "weight": 1.0,
                                              "temperature": 2.0, "sha256": file_sha256(tmp_path / "teacher.pt")}
    assert student.trained_on.endswith(f"; distilled from {tmp_path.name}/teacher.pt")
    faces = [path.read_bytes() for path in sorted((tmp_path / "train").glob("*/*"))]

    def happy_share(model) -> float:
        predictor = Predictor(model, device="cpu", precision="fp32")
        answers = [row["predicted_label"] for row in predictor.predict_bytes(faces)]
        return answers.count("happy") / len(answers)

    assert happy_share(student) > 0.9

    delivered = (tmp_path / "student.pt").read_bytes()
    save_checkpoint(tiny_checkpoint(seed=1), tmp_path / "teacher.pt")
    assert command_refusal("train", *student_flags(tmp_path, "--distillation", setting, "--resume"), env=job_env) == (
        "error: --resume: cannot resume under a different recipe: distillation changed")
    assert (tmp_path / "student.pt").read_bytes() == delivered, "the run's checkpoint is kept"

    (tmp_path / "runs").rename(tmp_path / "taught-runs")
    assert train(tmp_path, job_env).returncode == 0
    assert happy_share(load_checkpoint(tmp_path / "student.pt")) < 0.5, "taught by the labels, it tells faces apart"
