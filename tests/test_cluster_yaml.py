"""cluster.yaml checked the way `ray up` checks it before it talks to AWS.

Ray has no public validator for cluster launcher configs; `ray up` runs
`ray.autoscaler._private.util.prepare_config` (merge with the provider's defaults) and then
`validate_config` (the shipped ray-schema.json plus cross-field checks), so these tests do too.
"""

import copy
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from serve.environment import serving_env

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
PROJECT_MOUNT = "~/emotion-ray"
TOKEN_FILE = "~/.ray/auth_token"


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def prepared(config):
    return prepare_config(copy.deepcopy(config))


def installs_project(commands):
    text = "\n".join(commands)
    return "pip install" in text and PROJECT_MOUNT in text


def test_cluster_yaml_passes_ray_validation(config):
    jsonschema.validate(config, SCHEMA)
    validate_config(prepared(config))
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"


def test_gpu_workers_autoscale(config):
    node_types = config["available_node_types"]
    head = config["head_node_type"]
    assert node_types[head]["resources"].get("GPU", 0) == 0

    gpu_types = {name: spec for name, spec in node_types.items() if spec["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no node type offers a GPU"
    assert head not in gpu_types
    for spec in gpu_types.values():
        assert spec["max_workers"] > spec.get("min_workers", 0)
        assert config["max_workers"] >= spec["max_workers"], "global max_workers caps the GPU type"


def test_every_node_installs_the_project(config):
    assert config["file_mounts"][PROJECT_MOUNT] == "."
    merged = prepared(config)
    assert installs_project(merged["head_setup_commands"])
    for name, spec in merged["available_node_types"].items():
        if name != merged["head_node_type"]:
            assert installs_project(spec.get("worker_setup_commands", merged["worker_setup_commands"])), name


def test_start_commands_and_token_auth(config):
    head_start = "\n".join(config["head_start_ray_commands"])
    worker_start = "\n".join(config["worker_start_ray_commands"])
    assert "ray start --head --port=6379" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--dashboard-host=0.0.0.0" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start

    assert TOKEN_FILE in config["file_mounts"]
    assert "RAY_AUTH_MODE=token" in "\n".join(config["initialization_commands"])


def test_every_node_starts_ray_with_the_serve_environment(config):
    """The start commands' own shell text, run against this checkout, exports conf/serve.env."""
    expected = serving_env()
    assert expected, "conf/serve.env sets nothing"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = next(c for c in config[key] if "ray start" in c)
        prefix = command[: command.index("ray start")].replace(PROJECT_MOUNT, str(ROOT))
        shell = subprocess.run(["bash", "-c", prefix + " env"], capture_output=True, text=True, check=True)
        exported = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
        assert {k: exported.get(k) for k in expected} == expected, key


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda c: c.update(gpu_workers={"max_workers": 8}), id="unknown-top-level-key"),
        pytest.param(lambda c: c.update(max_workers="lots"), id="max-workers-not-int"),
        pytest.param(
            lambda c: next(s for s in c["available_node_types"].values() if "GPU" in s["resources"])[
                "resources"
            ].update(GPU=0.5),
            id="fractional-gpu-resource",
        ),
    ],
)
def test_broken_copy_fails_validation(config, break_it):
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepared(broken))
