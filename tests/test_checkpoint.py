import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emotion.checkpoint as checkpoint_module
from emotion.checkpoint import (
    DEFAULT_CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    load_checkpoint_file,
    save_checkpoint,
)
from emotion.labels import LABELS
from tests.conftest import file_sha256, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_keeps_every_field(tmp_path):
    original = tiny_checkpoint(metrics={"validation": {"val_accuracy": 0.5}})
    save_checkpoint(original, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.describe() == original.describe()
    assert loaded.labels == LABELS
    assert loaded.num_params == sum(p.numel() for p in loaded.build().parameters())
    for key, tensor in original.state_dict.items():
        assert torch.equal(loaded.state_dict[key], tensor)


def test_the_digest_and_size_are_of_the_bytes_loaded_even_if_the_file_changes_after(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(tiny_checkpoint(), path)
    loaded_digest, loaded_size = file_sha256(path), path.stat().st_size
    read = checkpoint_module._read

    def read_then_replace(where: str) -> bytes:
        data = read(where)
        save_checkpoint(tiny_checkpoint(seed=1, name="other"), path)
        return data

    monkeypatch.setattr(checkpoint_module, "_read", read_then_replace)
    checkpoint, digest, size = load_checkpoint_file(path)
    assert (checkpoint.name, digest, size) == ("tiny", loaded_digest, loaded_size)
    assert file_sha256(path) != digest


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file_is_refused(tmp_path):
    save_checkpoint(tiny_checkpoint(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_wrong_architecture_is_refused(tmp_path):
    good = tiny_checkpoint()
    wrong = tiny_checkpoint(arch="resnet18", arch_kwargs={})
    save_checkpoint(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"wrong\.pt: weights do not fit architecture 'resnet18'"):
        load_checkpoint(tmp_path / "wrong.pt")
    unknown = tiny_checkpoint(arch="no_such_net")
    save_checkpoint(unknown, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match=r"unknown\.pt: unknown architecture 'no_such_net'"):
        load_checkpoint(tmp_path / "unknown.pt")
    with torch.inference_mode():
        assert good.build().eval()(torch.zeros(2, 1, 48, 48)).shape == (2, len(good.labels))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    buffer = io.BytesIO()
    torch.save({"format": "emotion-ray/checkpoint", "payload": _RunsCode()}, buffer)
    (tmp_path / "evil.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused: .*could run code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match=r"plain\.pkl"):
        load_checkpoint(plain)
    assert not (tmp_path / "pwned").exists()


def test_other_torch_files_are_not_checkpoints(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not an emotion-ray checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a directory|cannot read"):
        load_checkpoint(tmp_path)


def test_default_checkpoint_is_embedded():
    checkpoint = load_checkpoint()
    assert DEFAULT_CHECKPOINT.is_file()
    assert checkpoint.labels == LABELS
    assert checkpoint.input_size == 48 and checkpoint.channels == 1
    validation = checkpoint.metrics["validation"]
    # The targets (66%, 0.60); the committed model's own figures are in docs/model-card.md.
    assert validation["val_accuracy"] >= 0.66 and validation["val_macro_f1"] >= 0.60


GARBAGE_TAIL = b"this is not a checkpoint\nbut a second line of text\n"


@pytest.mark.parametrize("first", range(256), ids=lambda b: f"0x{b:02x}")
def test_any_first_byte_of_garbage_is_refused_in_one_line(tmp_path, first):
    """Each first byte steers torch's unpickler somewhere else; every path must end in a refusal."""
    path = tmp_path / f"garbage-{first:02x}.pt"
    path.write_bytes(bytes([first]) + GARBAGE_TAIL)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ")
    # 'c' followed by text is a pickle GLOBAL opcode naming a callable: refused as unsafe.
    reasons = ("not a readable checkpoint", "not an emotion-ray checkpoint", "could run code")
    assert any(reason in message for reason in reasons), message
    assert "\n" not in message


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("model: emotion_cnn\nlabels: angry, disgust, fear\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a readable checkpoint"):
        load_checkpoint(path)


def test_scoring_cli_refuses_a_text_file_as_model_in_one_line(tmp_path):
    model = tmp_path / "text.txt"
    model.write_text("not a model\n")
    result = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--input", str(ROOT / "examples" / "faces"),
         "--output", str(tmp_path / "out"), "--model", str(model)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "text.txt: not a readable checkpoint" in lines[0]
    assert not (tmp_path / "out").exists()
