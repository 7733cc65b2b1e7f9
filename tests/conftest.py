"""Shared fixtures: a small checkpoint built in-process, and the path to the shared data."""

import gc
import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType

import pytest
import ray
import torch

from emotion.checkpoint import Checkpoint, new_checkpoint, save_checkpoint
from emotion.labels import LABELS
from emotion.models import build_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FER2013 = SHARED_DATA / "fer2013"


def require_fer2013() -> Path:
    """The shared FER2013 folder, or a skip saying why the test cannot run."""
    if not (FER2013 / "validation").is_dir():
        pytest.skip(f"shared FER2013 data not found at {FER2013} (only present beside the CI clone)")
    return FER2013


def file_sha256(path: str | Path) -> str:
    """The sha256 a job should record for the file at `path`."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_checkpoint(seed: int = 0, name: str = "tiny", **fields: object):
    torch.manual_seed(seed)
    model = build_model("emotion_cnn", len(LABELS), 1, widths=(8, 16), depth=2)
    values = {
        "arch": "emotion_cnn",
        "arch_kwargs": {"widths": [8, 16], "depth": 2},
        "labels": LABELS,
        "input_size": 48,
        "channels": 1,
        "mean": (0.5,),
        "std": (0.25,),
        "name": name,
        "trained_on": "random initialisation (tests)",
    }
    values.update(fields)
    return new_checkpoint(model.eval(), **values)


def splitting_margin(checkpoint: Checkpoint, x: torch.Tensor) -> float:
    """A cascade margin that splits `x` (normalised faces) in half: the first member, `checkpoint`,
    answers alone for one half and every member weighs the other. Halfway between the middle two
    top-1 minus top-2 gaps, so rounding never moves a face across it."""
    with torch.inference_mode():
        top2 = torch.softmax(checkpoint.build()(x), dim=1).topk(2, dim=1).values
    gaps = (top2[:, 0] - top2[:, 1]).sort().values
    middle = len(gaps) // 2
    return float(gaps[middle - 1] + gaps[middle]) / 2


@pytest.fixture
def tiny_checkpoint_path(tmp_path) -> Path:
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_checkpoint(), path)
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head with token auth, shared by the end-to-end tests of one session."""
    from tests.services import ray_head

    with ray_head() as head:
        yield head


@pytest.fixture(scope="session")
def job_env(ray_cluster) -> MappingProxyType:
    """The environment of a job run as `python -m jobs.X` on a machine of the session's cluster,
    as a user runs a driver there: Ray is joined, not started, so each job saves the seconds a
    local Ray takes to start and stop.

    A read-only snapshot of this process's environment when a test first asked for it: what a
    test sets in os.environ later does not reach it, and the cluster's workers inherit the head's
    environment, not this one."""
    return MappingProxyType(ray_cluster.env(RAY_ADDRESS=ray_cluster.gcs_address))


# Categories a `python -m` run does not show by default (warnings.filters of a plain interpreter).
UNSHOWN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.fixture
def refuse(capsys, caplog) -> Callable[..., str]:
    """Run a job's `main` in this process on flags it must refuse with exit code `code`, and
    return the one line it printed on stderr, after argparse's usage where `usage` says
    argparse refused.

    In this process a refusal costs no Python start, but pytest takes logging and warnings away
    from stderr, so this checks them apart, as `python -m jobs.X` would show them (the jobs'
    loggers at INFO, libraries at WARNING, warnings but the default-hidden categories): a refusal
    logs nothing, warns nothing, prints nothing on stdout and ends before Ray starts; the
    environment is put back as it was. Each job keeps one refusal run as a command as well, for
    what its import and interpreter print."""
    def run(main: Callable[[Sequence[str]], int | None], *args: str, code: int = 2, usage: bool = False) -> str:
        # What earlier tests left for the collector (an unclosed client, an unawaited coroutine)
        # would otherwise warn while the job runs, as if the job had.
        gc.collect()
        capsys.readouterr()
        caplog.clear()
        environment = dict(os.environ)
        with caplog.at_level(logging.INFO, logger="jobs"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                returned = main(list(args))
            except SystemExit as exit_:
                returned = exit_.code
            finally:
                # A job's main may export settings (AWS_ENDPOINT_URL) as its process's own; here
                # they would reach later tests.
                os.environ.clear()
                os.environ.update(environment)
        out = capsys.readouterr()
        assert returned == code, (returned, out.err)
        assert not ray.is_initialized(), "refused before Ray starts"
        assert out.out == "", out.out
        assert not caplog.records, [record.getMessage() for record in caplog.records]
        shown = [str(w.message) for w in caught if not issubclass(w.category, UNSHOWN_WARNINGS)]
        assert not shown, shown
        *before, line = out.err.splitlines()
        if usage:
            assert before and before[0].startswith("usage: ") and all(b.startswith(" ") for b in before[1:]), out.err
        else:
            assert not before, out.err
        return line
    return run


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on loopback, with the AWS variables a client needs to reach it."""
    from tests.services import s3_server

    with s3_server() as server:
        yield server


def pipeline(**overrides: object):
    """The scoring job's pipeline settings as conf/score.yaml gives them, with `overrides`."""
    import dataclasses

    from jobs.pipeline import pipeline_config
    from jobs.score import build_parser

    defaults = pipeline_config(build_parser().parse_args(["--input", "in", "--output", "out"]))
    return dataclasses.replace(defaults, **overrides)


def with_int8_graph(checkpoint: Checkpoint, faces: int = 128) -> Checkpoint:
    """`checkpoint` carrying its network quantized to int8, calibrated on random normalised faces,
    as `python -m jobs.quantize` stores it (without its check on answers, which a random network
    need not pass)."""
    import numpy as np

    from emotion.portable import export_bytes, quantized_bytes

    size, channels = checkpoint.input_size, checkpoint.channels
    calibration = np.random.default_rng(1).normal(0, 1, (faces, channels, size, size)).astype(np.float32)
    return checkpoint.with_int8_graph(quantized_bytes(export_bytes(checkpoint), calibration))
