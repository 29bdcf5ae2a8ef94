"""ray_cluster.yaml is a config `ray up` accepts, and it agrees with the project.

Validation is Ray's own, in the order `ray up` runs it (ray.autoscaler._private.commands._bootstrap_config):
`prepare_config` (merge the provider's defaults.yaml, merge setup commands, check the docker section, fill
per-node-type min/max workers), then `validate_config` (JSON schema ray-schema.json plus the cross-field
checks). Everything after that in `ray up` talks to AWS, so it is out of scope here. Offline and fast.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")  # validate_config needs it; it comes with ray[default]
ray_util = pytest.importorskip("ray.autoscaler._private.util")
from packaging.requirements import Requirement  # noqa: E402  (ray depends on packaging)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
PYPROJECT = ROOT / "pyproject.toml"
GRPC_PORT = 50051

# `ray==X`, `ray[default]==X`, `"ray[default]==X"` inside a pip command.
RAY_PIN = re.compile(r"(?<![\w.-])ray(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.+-]*)")


@pytest.fixture(scope="module")
def raw_config() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        config = yaml.safe_load(f)
    assert isinstance(config, dict), "ray_cluster.yaml must be a mapping"
    return config


@pytest.fixture(scope="module")
def prepared(raw_config: dict[str, Any]) -> dict[str, Any]:
    config = ray_util.prepare_config(copy.deepcopy(raw_config))
    ray_util.validate_config(config)
    return config


def _pyproject_ray_version() -> str:
    with PYPROJECT.open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        if req.name == "ray":
            pins = [s.version for s in req.specifier if s.operator == "=="]
            assert len(pins) == 1, f"pyproject pins ray loosely ({dep!r}); the cluster needs an exact pin"
            return pins[0]
    raise AssertionError("pyproject.toml has no ray dependency")


def _gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != head and node.get("resources", {}).get("GPU", 0) >= 1
    }


def test_ray_accepts_the_config(prepared: dict[str, Any]) -> None:
    # The fixture already ran prepare_config + validate_config; a few of the things that guarantees.
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_synced_files"] == []
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_and_gpu_workers(prepared: dict[str, Any]) -> None:
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    assert head["max_workers"] == 0
    assert head["resources"].get("GPU", 0) == 0, "the head runs the gateway; it should not be a GPU node"

    gpu_workers = _gpu_worker_types(prepared)
    assert gpu_workers, "no worker node type declares a GPU in `resources`"
    for name, node in gpu_workers.items():
        # Declared explicitly: `ray up` cannot autodetect resources without AWS access, and the
        # one-slice-per-GPU placement depends on exactly one GPU per worker.
        assert node["resources"]["GPU"] == 1, f"{name}: one GPU per worker expected"
        assert re.match(r"^(g[4-9]|p[3-9])", node["node_config"]["InstanceType"]), (
            f"{name}: {node['node_config']['InstanceType']} is not a GPU instance type"
        )
    min_gpus = sum(n["min_workers"] * n["resources"]["GPU"] for n in gpu_workers.values())
    assert min_gpus >= 2, "a 2-slice model needs 2 GPUs up from the start"
    assert all(n["max_workers"] >= n["min_workers"] for n in gpu_workers.values())
    assert prepared["max_workers"] > min_gpus, "leave headroom above the minimum"


def test_ray_version_pinned_to_pyproject(prepared: dict[str, Any]) -> None:
    want = _pyproject_ray_version()
    commands = prepared["head_setup_commands"] + prepared["worker_setup_commands"]
    pins = {m.group(1) for cmd in commands for m in RAY_PIN.finditer(cmd)}
    assert pins == {want}, f"setup commands pin ray {sorted(pins)}, pyproject pins {want}"
    # Both node kinds install the pin (setup_commands is merged into both lists by prepare_config).
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(RAY_PIN.search(c) for c in prepared[key]), f"{key} does not pin ray"

    docker = prepared.get("docker", {})
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    for image in images:
        if image.startswith("rayproject/"):
            tag = image.partition(":")[2]
            assert tag.startswith(f"{want}-") or tag == want, f"{image} does not match ray {want}"


def test_project_is_synced_and_installed(prepared: dict[str, Any]) -> None:
    mounts = prepared["file_mounts"]
    assert "~/qwen-relay" in mounts
    local = Path(mounts["~/qwen-relay"]).expanduser()
    local = local if local.is_absolute() else ROOT / local  # `ray up` runs from the repository root
    assert (local / "pyproject.toml").resolve() == PYPROJECT.resolve()
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install -e ~/qwen-relay" in c for c in prepared[key]), key


def test_start_commands(prepared: dict[str, Any]) -> None:
    head = " ; ".join(prepared["head_start_ray_commands"])
    assert "ray start --head --port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=127.0.0.1" in head  # the job API runs code: loopback only, reached over SSH
    worker = " ; ".join(prepared["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


def test_grpc_port_is_documented_and_not_public(raw_config: dict[str, Any]) -> None:
    text = CLUSTER_YAML.read_text()
    assert str(GRPC_PORT) in text
    assert f"ray attach ray_cluster.yaml -p {GRPC_PORT}" in text

    rules = raw_config["provider"].get("security_group", {}).get("IpPermissions", [])
    grpc_rules = [r for r in rules if r["FromPort"] <= GRPC_PORT <= r["ToPort"]]
    assert grpc_rules, f"no security group rule for port {GRPC_PORT}"
    for rule in grpc_rules:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
        cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        assert cidrs and not {"0.0.0.0/0", "::/0"} & set(cidrs), f"port {GRPC_PORT} open to the world"
    assert not [r for r in rules if r["FromPort"] <= 8265 <= r["ToPort"]], "the Ray job API (8265) runs code"
    assert "no authentication of its own" not in text  # the gateway has a bearer token and TLS


@pytest.mark.parametrize(
    "breakage",
    [
        "unknown_top_level_key",
        "missing_node_config",
        "bad_head_node_type",
        "min_workers_over_global_max",
        "string_resource",
    ],
)
def test_ray_validation_rejects_broken_copies(raw_config: dict[str, Any], breakage: str) -> None:
    """Guard against a vacuous check: the same validation path must reject a broken config."""
    config = copy.deepcopy(raw_config)
    worker = next(iter(_gpu_worker_types(config)))
    if breakage == "unknown_top_level_key":
        config["head_start_commands"] = ["ray start --head"]  # typo of head_start_ray_commands
    elif breakage == "missing_node_config":
        del config["available_node_types"][worker]["node_config"]
    elif breakage == "bad_head_node_type":
        config["head_node_type"] = "ray.head.missing"
    elif breakage == "min_workers_over_global_max":
        config["available_node_types"][worker]["min_workers"] = config["max_workers"] + 1
    elif breakage == "string_resource":
        config["available_node_types"][worker]["resources"]["GPU"] = "1"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_util.validate_config(ray_util.prepare_config(config))
