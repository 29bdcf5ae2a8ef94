"""ray_cluster.yaml is a config `ray up` accepts, and it agrees with the project.

Validation is Ray's own, in the order `ray up` runs it (ray.autoscaler._private.commands._bootstrap_config):
`prepare_config` (merge the provider's defaults.yaml, merge setup commands, check the docker section, fill
per-node-type min/max workers), then `validate_config` (JSON schema ray-schema.json plus the cross-field
checks). Everything after that in `ray up` talks to AWS, so it is out of scope here. Offline and fast.
"""

from __future__ import annotations

import ast
import copy
import re
import shlex
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
DEPLOY_MD = ROOT / "docs" / "deploy.md"
# GPUs and their Ray accelerator type per EC2 instance type the config may use.
INSTANCE_GPUS = {"g5.xlarge": (1, "A10G"), "g6.xlarge": (1, "L4"), "g5.12xlarge": (4, "A10G"),
                 "g6.12xlarge": (4, "L4"), "g5.48xlarge": (8, "A10G"), "p4d.24xlarge": (8, "A100"),
                 "p5.48xlarge": (8, "H100")}

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
        # Declared explicitly: `ray up` cannot autodetect resources without AWS access, and a slice reserves
        # one GPU per tensor-parallel rank, so the count must be the instance's own.
        instance = node["node_config"]["InstanceType"]
        assert re.match(r"^(g[4-9]|p[3-9])", instance), f"{name}: {instance} is not a GPU instance type"
        assert instance in INSTANCE_GPUS, f"{name}: add {instance}'s GPUs and accelerator to INSTANCE_GPUS"
        assert node["resources"]["GPU"] == INSTANCE_GPUS[instance][0], f"{name}: {instance} has other GPUs"
        assert node["resources"].get(f"accelerator_type:{INSTANCE_GPUS[instance][1]}") == 1, (
            f"{name}: its accelerator_type resource is what a layout's request_resources names")
    assert any(n["resources"]["GPU"] == 1 and n["min_workers"] >= 2 for n in gpu_workers.values()), (
        "the default layout: one slice per 1-GPU worker")
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


def _serve_commands(text: str) -> list[list[str]]:
    """Every `qwen-relay serve ...` command in `text` (comment markers and line continuations removed)."""
    lines = [line.strip().removeprefix("#").strip() for line in text.splitlines()]
    joined = " ".join(line.removesuffix("\\").strip() if line.endswith("\\") else line + "\n" for line in lines)
    return [shlex.split(m.group(0)) for m in re.finditer(r"qwen-relay serve [^\n]*", joined)]


def _requested(text: str) -> list[list[dict[str, float]]]:
    """The bundles of every `request_resources(bundles=...)` in `text` that asks for nodes (not the release,
    `bundles=[]`), evaluated as the head's Python would."""
    pattern = r"request_resources\(bundles=(\[.+?\])(?: \* (\d+))?\)"
    return [ast.literal_eval(m.group(1)) * int(m.group(2) or 1)  # a literal list, maybe repeated
            for m in re.finditer(pattern, text.replace('\\"', '"'))]


def test_tensor_parallel_layouts_fit_their_node_types(prepared: dict[str, Any]) -> None:
    """The yaml's and docs/deploy.md's layouts (TP 4 x PP 2 on one 8-GPU node; 2 nodes x TP 4) are the same
    commands; serve's own parser takes them; each node type a layout asks for exists, holds its slices (STRICT_PACK:
    every slice's GPUs on one node; STRICT_SPREAD: one slice a node) and may start as many nodes as it needs."""
    from qwen_relay.server.cli import build_parser, serve_options

    yaml_text, docs = CLUSTER_YAML.read_text(), DEPLOY_MD.read_text()
    layouts = [c for c in _serve_commands(yaml_text) if "--tensor-parallel" in c]
    assert len(layouts) == 2
    assert layouts == [c for c in _serve_commands(docs) if "--tensor-parallel" in c], "docs and yaml disagree"
    requests = _requested(yaml_text)
    assert requests == _requested(docs) and len(requests) == len(layouts)
    nodes = _gpu_worker_types(prepared)
    strategies = set()
    for command, bundles in zip(layouts, requests, strict=True):
        options = serve_options(build_parser("serve").parse_args(command[1:]))
        assert options.device == "cuda" and options.tensor_parallel == 4 and options.shards == 2
        fits = [n for n in nodes.values() if all(n["resources"].get(k, 0) >= v for k, v in bundles[0].items())]
        assert len(fits) == 1, f"{bundles[0]} must pick exactly one node type, not {len(fits)}"
        node = fits[0]
        assert node["max_workers"] >= len(bundles)
        gpus = node["resources"]["GPU"]
        strategies.add(options.placement_strategy)
        if options.placement_strategy == "STRICT_PACK":  # every slice on one node
            assert len(bundles) == 1 and gpus >= options.shards * options.tensor_parallel
        else:  # one slice a node
            assert options.placement_strategy == "STRICT_SPREAD"
            assert len(bundles) == options.shards and gpus >= options.tensor_parallel
        assert node["resources"]["CPU"] >= options.tensor_parallel * (options.shards if len(bundles) == 1 else 1)
    assert strategies == {"STRICT_PACK", "STRICT_SPREAD"}
    total = sum(n["min_workers"] for n in nodes.values()) + max(len(b) for b in requests)
    assert prepared["max_workers"] >= total, "the global cap leaves no room for a layout's nodes"


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
