"""cluster.yaml against the cluster-launcher schema of the installed ray, and our own rules:
GPU workers, paddlepaddle-gpu in the setup, token authentication on every `ray start`."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
SCHEMA_PATH = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def config() -> dict:
    with open(CLUSTER_YAML, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


def _worker_types(config: dict) -> dict[str, dict]:
    return {
        k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]
    }


def test_matches_ray_schema(config: dict, schema: dict) -> None:
    jsonschema.validate(config, schema)


def test_ray_up_accepts_it(config: dict) -> None:
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, then
    # validate (schema plus cross-field checks such as head_node_type and min_workers).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def _drop_provider(c: dict) -> None:
    del c["provider"]


def _max_workers_as_text(c: dict) -> None:
    c["max_workers"] = "four"


def _fractional_gpus(c: dict) -> None:
    next(iter(_worker_types(c).values()))["resources"]["GPU"] = 0.5


def _node_type_without_node_config(c: dict) -> None:
    del c["available_node_types"][c["head_node_type"]]["node_config"]


def _unknown_top_level_key(c: dict) -> None:
    c["setup_command"] = ["typo of setup_commands"]


def _command_not_a_string(c: dict) -> None:
    c["setup_commands"].append(["pip", "install", "x"])


@pytest.mark.parametrize(
    "mutate",
    [
        _drop_provider,
        _max_workers_as_text,
        _fractional_gpus,
        _node_type_without_node_config,
        _unknown_top_level_key,
        _command_not_a_string,
    ],
)
def test_schema_rejects_broken_copies(config: dict, schema: dict, mutate) -> None:
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_workers_have_gpus_and_can_scale(config: dict) -> None:
    workers = _worker_types(config)
    assert workers, "cluster.yaml defines no worker node type"
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, f"worker type {name} has no GPU"
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= config["max_workers"]
    assert sum(n.get("min_workers", 0) for n in workers.values()) >= 1


def test_setup_installs_paddle_gpu_and_this_package(config: dict) -> None:
    commands = config["setup_commands"]
    installs = [c for c in commands if re.search(r"\bpip install\b", c)]
    # Paddle 3.x GPU wheels come from PaddlePaddle's own index (PyPI stops at 2.6.2).
    gpu = [c for c in installs if "paddlepaddle-gpu" in c]
    assert len(gpu) == 1, commands
    assert re.search(r"paddlepaddle-gpu==3\.\d+\.\d+ ", gpu[0]), gpu
    assert re.search(r" -i https://www\.paddlepaddle\.org\.cn/packages/stable/cu\d+/$", gpu[0])
    assert any("fd-ray-sync" in c for c in installs), commands
    # The CPU wheel would shadow the GPU one (both are the `paddle` module).
    cpu_wheel = re.compile(r"""(?:^|\s)["']?paddlepaddle(?:[=<>!~\s"']|$)""")
    assert not any(cpu_wheel.search(c) for c in installs), installs


def test_every_ray_start_uses_token_auth(config: dict) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, f"{key} starts no ray"
        for command in starts:
            assert "RAY_AUTH_MODE=token" in command, f"{key}: {command!r}"
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text(encoding="utf-8")


def test_token_reaches_every_node(config: dict) -> None:
    # file_mounts go to the head and every worker.
    assert "~/.ray/auth_token" in config["file_mounts"]
