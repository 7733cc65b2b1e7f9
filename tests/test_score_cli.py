"""The scoring job's command line: every bad flag or input is one line, in seconds, before Ray starts."""

import json
import subprocess
import time
from dataclasses import asdict

import pytest

from emotion.checkpoint import save_checkpoint
from emotion.uris import absolute_uri
from jobs import score as score_job
from jobs.output import RUN_RECORD, run_record
from jobs.pipeline import face_settings
from tests.conftest import file_sha256, tiny_checkpoint
from tests.images import jpeg
from tests.services import run_job


def score(*args: str) -> subprocess.CompletedProcess:
    return run_job("score", *args, timeout=120)


@pytest.fixture
def faces(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg())
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "/nonexistent/faces"], "error: --input /nonexistent/faces: no such folder or prefix"),
        (["--model", "/nonexistent/model.pt"], "error: --model /nonexistent/model.pt: no such checkpoint file"),
        (["--batch-size", "0"], "error: --batch-size must be positive, not 0"),
        (["--gpus-per-actor", "-1"], "error: --gpus-per-actor must be zero or more, not -1.0"),
        (["--min-actors", "3", "--max-actors", "2"], "error: --min-actors 3 is larger than --max-actors 2"),
        (["--min-actors", "3"], "error: --min-actors and --max-actors go together"),
        (["--faces", "some"], "error: --faces some: expected one of whole, detect, auto"),
        (["--backend", "tensorrt"], "error: --backend tensorrt: expected one of torch, onnxruntime"),
        (["--backend", "onnxruntime", "--precision", "bf16"],
         "error: --backend onnxruntime runs float32 or int8: --precision bf16 is not possible "
         "(use auto, fp32 or int8)"),
        (["--backend", "onnxruntime", "--gpus-per-actor", "1"],
         "error: --backend onnxruntime runs on the CPU only: drop --gpus-per-actor and --device "
         "(got 1 GPUs per actor, device default)"),
        (["--precision", "int8", "--device", "cuda"],
         "error: --precision int8 runs on the CPU only: drop --gpus-per-actor and --device "
         "(got 0 GPUs per actor, device cuda)"),
        (["--precision", "int8"],
         "error: --precision int8: the model carries no int8 graph (python -m jobs.quantize makes one)"),
    ],
)
def test_bad_flags_fail_fast_with_one_line(tmp_path, faces, tiny_checkpoint_path, refuse, args, message):
    """In this process, so that a dozen refusals do not each pay for a Python start: the other
    tests here run the command itself and see that nothing else reaches stderr."""
    base = {"--input": str(faces), "--output": str(tmp_path / "out"), "--model": str(tiny_checkpoint_path)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    started = time.monotonic()
    assert refuse(score_job.main, *[x for kv in base.items() for x in kv]) == message
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out").exists()


def test_empty_input_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    result = score("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: --input {tmp_path / 'empty'}: no image files found")


def test_corrupt_model_is_named(tmp_path, faces):
    save_checkpoint(tiny_checkpoint(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[:1000])
    result = score("--input", str(faces), "--output", str(tmp_path / "out"), "--model", str(tmp_path / "m.pt"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: --model {tmp_path / 'm.pt'}: not a readable checkpoint")


def test_complete_output_is_not_replaced_without_overwrite(tmp_path, faces, tiny_checkpoint_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_manifest.json").write_text("{}")
    result = score("--input", str(faces), "--output", str(out), "--model", str(tiny_checkpoint_path))
    assert result.returncode == 2
    assert "already holds a complete run (_manifest.json); pass --overwrite" in result.stderr


def test_partial_run_of_another_backend_is_not_resumed(tmp_path, faces, tiny_checkpoint_path):
    """Rows of two backends differ in their last digits: one output holds one backend's."""
    out = tmp_path / "out"
    out.mkdir()
    model = absolute_uri(str(tiny_checkpoint_path))
    record = run_record(absolute_uri(str(faces)), model, file_sha256(model), None, "auto") | {
        "faces": {"mode": "auto", "config": asdict(face_settings(None))}, "backend": "torch"}
    (out / RUN_RECORD).write_text(json.dumps(record))
    result = score("--input", str(faces), "--output", str(out), "--model", str(tiny_checkpoint_path),
                   "--backend", "onnxruntime")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --output {out} holds a partial run made with --backend torch "
                                     "(now onnxruntime); rerun with the same backend to resume, or pass "
                                     "--overwrite to start again")
