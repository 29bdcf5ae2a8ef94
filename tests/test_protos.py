"""The committed stubs are what grpcio-tools generates from relay.proto (`make protos`), so an edit to the
.proto that was never regenerated, or a hand edit to a stub, fails here rather than on the wire."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1] / "protos"
STUBS = ["relay_pb2.py", "relay_pb2.pyi", "relay_pb2_grpc.py"]
# The generator stamps its own version into the stubs (the runtime floor it asks for); the committed ones are
# kept at the floors bench/precheck.py checks, so a newer grpcio-tools here is not a difference from the .proto.
STAMPS = [re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), re.compile(r"^# Protobuf Python Version: .*$", re.M),
          re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)$", re.M)]


def _without_stamps(text: str) -> str:
    for stamp in STAMPS:
        text = stamp.sub("<version stamp>", text)
    return text


def test_committed_stubs_match_relay_proto(tmp_path):
    well_known = files("grpc_tools") / "_proto"  # google/protobuf/struct.proto, as `python -m grpc_tools.protoc`
    args = ["protoc", "-I", str(ROOT), "-I", str(well_known), f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(ROOT / "qwen_relay/v1/relay.proto")]
    assert protoc.main(args) == 0
    for name in STUBS:
        fresh = (tmp_path / "qwen_relay/v1" / name).read_text()
        committed = (ROOT / "qwen_relay/v1" / name).read_text()
        assert _without_stamps(committed) == _without_stamps(fresh), (
            f"protos/qwen_relay/v1/{name} differs from what grpcio-tools generates from relay.proto: `make protos`")
