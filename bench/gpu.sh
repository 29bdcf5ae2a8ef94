#!/usr/bin/env bash
# The relay benchmark on one GPU: a random-weight Qwen2.5-7B-shaped checkpoint in bf16, hf `generate()`
# against the relay with 1 and 2 slices on the same card, plus the memory-bandwidth floor
# (weight bytes read per decode step / measured device-to-device copy bandwidth). Aimed at one H100 in
# under 10 minutes: building the 15 GB checkpoint is ~2 of them, three model loads another 1-2.
#
# The lent GPU image has no Ray (docs/benchmarks.md), so the relay runs in-process (--no-ray: LocalPipeline,
# the same slice runners, engine and gRPC server the Ray actors wrap). Usage, from anywhere:
#
#   bench/gpu.sh                        # defaults below; writes bench-out/gpu/
#   OUT=/tmp/b SHARDS=2 bench/gpu.sh    # knobs are environment variables; extra arguments go to the bench
#   SHAPE=tiny DEVICE=cpu DTYPE=float32 bench/gpu.sh   # a dry run of this script on a CPU machine
#
# What it needs besides torch/transformers/accelerate/safetensors/tokenizers/grpcio/matplotlib:
# grpcio-health-checking, grpcio-reflection, prometheus-client and protobuf >= 7.35 (the generated stubs).
# Missing ones are installed offline from $WHEELS (default bench/wheels) when that folder exists; prepare it
# on a machine with a network:
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d bench/wheels grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 prometheus-client protobuf==7.36.2
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-bench-out/gpu}"
MODEL_CACHE="${MODEL_CACHE:-$HOME/.cache/qwen-relay/bench}"
WHEELS="${WHEELS:-$ROOT/bench/wheels}"
SHAPE="${SHAPE:-qwen2.5-7b}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
SHARDS="${SHARDS:-1,2}"
SHIMS="$(mktemp -d)"
trap 'rm -rf "$SHIMS"' EXIT
# No Ray needed: with --no-ray nothing on the relay's path imports it (server/ray_pipeline.py holds what does).

has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

echo "== versions"
"$PY" - <<'EOF'
import platform, torch, transformers
from google.protobuf import __version__ as protobuf
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, protobuf {protobuf}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.0f} GiB")
EOF

# 1. The project's folders map to qwen_relay.* (pyproject's package-dir); without `pip install -e .` make that
#    mapping with symlinks (qwen_relay becomes a namespace package).
if ! has qwen_relay.server || [[ -n "${FORCE_SYMLINKS:-}" ]]; then
    mkdir -p "$SHIMS/qwen_relay"
    for pkg in server shards client train; do ln -s "$ROOT/$pkg" "$SHIMS/qwen_relay/$pkg"; done
    ln -s "$ROOT/protos/qwen_relay/v1" "$SHIMS/qwen_relay/v1"
    export PYTHONPATH="$SHIMS${PYTHONPATH:+:$PYTHONPATH}"
    echo "== qwen_relay not installed: importing it from $ROOT through symlinks"
fi

# 2. Small pure-Python dependencies the image may lack, offline from the wheel folder.
missing=()
for mod in grpc_health grpc_reflection prometheus_client; do has "$mod" || missing+=("$mod"); done
"$PY" -c "from google.protobuf import __version__ as v; import sys; sys.exit(tuple(map(int, v.split('.')[:2])) < (7, 35))" \
    || missing+=("protobuf>=7.35")
if ((${#missing[@]})); then
    if [[ -d "$WHEELS" ]]; then
        echo "== installing from $WHEELS: ${missing[*]}"
        "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
    else
        echo "missing: ${missing[*]}; put their wheels in $WHEELS (see the top of $0)" >&2
        exit 1
    fi
fi

# 3. The benchmark. Smaller than the CPU defaults where it does not change what is measured: the H100 is
#    fast; the time goes to building and loading 15 GB of weights three times.
cd "$ROOT"
echo "== bench: $SHAPE, $DTYPE on $DEVICE, relay slices $SHARDS (in-process), results in $OUT"
exec "$PY" -m qwen_relay.bench.relay \
    --shape "$SHAPE" --model-cache "$MODEL_CACHE" --out "$OUT" \
    --device "$DEVICE" --dtype "$DTYPE" --no-ray --shards "$SHARDS" \
    --single-prompts 16,512 --single-new-tokens 64 --single-repeats 2 \
    --mixed-requests 32 --mixed-prompt 16-256 --mixed-new 16-128 --concurrency 1,4,16 \
    --uniform-requests 16 --uniform-prompt 64 --uniform-new 128 --uniform-concurrency 16 \
    "$@"
