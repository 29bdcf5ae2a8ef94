#!/usr/bin/env bash
# The relay benchmark on one GPU, made to run the first time it is given one (docs/benchmarks.md, "GPU run"):
# hf `generate()` against the relay with 1 and 2 slices sharing the card, on a random-weight checkpoint built
# here, plus the memory-bandwidth floor. The lent GPU machine has no Ray and no network, so the relay runs
# in-process (--no-ray: LocalPipeline, the same slice runners, engine and gRPC server the Ray actors wrap) and
# what its image lacks travels with the working tree (bench/wheels: `make gpu-wheels` downloads them there first;
# git ignores them, so copy that folder with the tree).
#
#   bench/gpu.sh                 # first run: Qwen2.5-1.5B shape, bf16, short workloads; ~3-5 min, budget 7.5 min
#   bench/gpu.sh --big           # the Qwen2.5-7B shape (15 GB) and longer single-stream runs; budget 9.5 min
#   OUT=/tmp/b SHARDS=2 bench/gpu.sh --single-new-tokens 32   # knobs are environment variables; other
#                                # arguments go to the bench (python -m qwen_relay.bench.relay --help)
#   SHAPE=tiny DEVICE=cpu DTYPE=float32 bench/gpu.sh   # a dry run of this whole script on a CPU machine
#   TENSOR_PARALLEL=2 SHAPE=tiny DEVICE=cpu DTYPE=float32 bench/gpu.sh   # the same with the TP phase (CPU ranks)
#
# Steps, each timed and each under `timeout` within BUDGET seconds in all: (1) make qwen_relay importable,
# install the carried wheels the image needs, check every import the run needs (fails in seconds, naming each
# missing piece); (2) build the checkpoint (cached in MODEL_CACHE); (3) the bench, which rewrites
# $OUT/bench.json and $OUT/table.md after every phase, so a run cut short still leaves the phases that finished;
# (4) on a machine with 2 GPUs or more (TENSOR_PARALLEL=auto; a size N forces it, off skips it), the relay with
# one slice at --tensor-parallel 2 (ranks on GPUs 0 and 1, NCCL) beside TP 1, single stream, into $OUT/tp; it
# gets TP_BUDGET seconds of its own, added to BUDGET and kept out of step 3's share.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${1:-}" == "--big" ]]; then
    shift
    SHAPE="${SHAPE:-qwen2.5-7b}"
    BUDGET="${BUDGET:-570}"
    WORKLOAD=(--single-prompts 16,512 --single-new-tokens 64 --single-repeats 2)
else
    SHAPE="${SHAPE:-qwen2.5-1.5b}"
    BUDGET="${BUDGET:-450}"
    WORKLOAD=(--single-prompts 16,256 --single-new-tokens 32 --single-repeats 1)
fi
WORKLOAD+=(--mixed-requests 32 --mixed-prompt 16-256 --mixed-new 16-128 --concurrency 1,4,16
           --uniform-requests 16 --uniform-prompt 64 --uniform-new 64 --uniform-concurrency 16)
PY="${PYTHON:-python3}"
OUT="${OUT:-bench-out/gpu}"
MODEL_CACHE="${MODEL_CACHE:-$HOME/.cache/qwen-relay/bench}"
WHEELS="${WHEELS:-$ROOT/bench/wheels}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
SHARDS="${SHARDS:-1,2}"
TENSOR_PARALLEL="${TENSOR_PARALLEL:-auto}"
TP_BUDGET="${TP_BUDGET:-240}"
cd "$ROOT"  # relative paths (OUT, MODEL_CACHE, WHEELS) are the repository root's
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS

# step NAME SECONDS CMD...: CMD under `timeout`, given at most SECONDS and what is left of BUDGET; says (on
# stderr, so a step's stdout can be captured) its wall time, or on a timeout what it was waiting for.
step() {
    local name="$1" limit="$2" t0=$SECONDS rc=0
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit <= 0)); then
        echo "== $name: not started, the ${BUDGET} s budget is spent" >&2
        return 124
    fi
    echo "== $name (at most ${limit} s)" >&2
    timeout --kill-after=15 "$limit" "$@" || rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "== $name: TIMED OUT after $((SECONDS - t0)) s (limit ${limit} s) waiting for: $*" >&2
    elif ((rc != 0)); then
        echo "== $name: FAILED (exit $rc) after $((SECONDS - t0)) s" >&2
    else
        echo "== $name: done in $((SECONDS - t0)) s" >&2
    fi
    return "$rc"
}

# 1. The project's folders map to qwen_relay.* (pyproject's package-dir); without `pip install -e .` make that
#    mapping with symlinks (qwen_relay becomes a namespace package).
if ! "$PY" -c "import qwen_relay.bench.precheck" 2>/dev/null || [[ -n "${FORCE_SYMLINKS:-}" ]]; then
    mkdir -p "$TMP/shims/qwen_relay"
    for pkg in server shards client train bench demo checkpoints; do ln -s "$ROOT/$pkg" "$TMP/shims/qwen_relay/$pkg"; done
    ln -s "$ROOT/protos/qwen_relay/v1" "$TMP/shims/qwen_relay/v1"
    export PYTHONPATH="$TMP/shims${PYTHONPATH:+:$PYTHONPATH}"
    echo "== qwen_relay not installed: importing it from $ROOT through symlinks"
fi
#    Carried wheels (bench/wheels/README.md) for what the image lacks or has too old, into a folder of their own
#    that shadows the image's packages for this run only.
mapfile -t wheels < <("$PY" -m qwen_relay.bench.precheck --wheels "$WHEELS" --wheels-needed)
if ((${#wheels[@]})); then
    echo "== installing ${#wheels[@]} carried wheel(s): ${wheels[*]##*/}"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$TMP/site" "${wheels[@]}"
    export PYTHONPATH="$TMP/site:$PYTHONPATH"
fi
relays=$(tr ',' '\n' <<<"$SHARDS" | grep -c .)
#    The tensor-parallel phase (step 4): how many GPUs this process sees decides it.
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null \
       || echo 0)
TP=0
if [[ "$TENSOR_PARALLEL" == auto ]]; then
    if [[ "$DEVICE" == cuda* ]] && ((GPUS >= 2)); then TP=2; fi
elif [[ "$TENSOR_PARALLEL" != off ]]; then
    TP="$TENSOR_PARALLEL"
fi
RESERVE=0
if ((TP > 1)); then
    BUDGET=$((BUDGET + TP_BUDGET))
    RESERVE=$TP_BUDGET
    echo "== $GPUS GPU(s) visible: a tensor-parallel phase (1,$TP) follows the bench, ${TP_BUDGET} s of its own"
else
    echo "== $GPUS GPU(s) visible: no tensor-parallel phase (TENSOR_PARALLEL=$TENSOR_PARALLEL; auto needs 2 GPUs)"
fi
step "pre-check of every import the run needs" 90 "$PY" -m qwen_relay.bench.precheck --wheels "$WHEELS" \
    --device "$DEVICE" --dtype "$DTYPE" --shape "$SHAPE" --relays "$relays" --model-cache "$MODEL_CACHE"

# 2. The random-weight checkpoint, built once into MODEL_CACHE (the bench's own folder naming, so it is reused).
MODEL=$(step "checkpoint: $SHAPE" 300 "$PY" -c '
import logging, pathlib, sys
from qwen_relay.bench.relay import default_model
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
print(default_model(sys.argv[1], sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4]).expanduser()))
' "$SHAPE" "$DTYPE" "$DEVICE" "$MODEL_CACHE" | tail -n 1)
[[ -f "$MODEL/config.json" ]] || { echo "== no checkpoint in '$MODEL'" >&2; exit 1; }

# what_finished RC DIR: after a bench step that failed, the phases it finished (its table), or that none did.
what_finished() {
    if (($1 == 0)); then
        return
    elif [[ -f "$2/table.md" ]]; then
        echo "== the phases that finished ($2/table.md):"
        cat "$2/table.md"
    else
        echo "== no phase finished: no table in $2" >&2
    fi
}

# 3. The bench, phase by phase; what finished is in $OUT/table.md even if this step is cut short. Step 4's
#    reserve is not its to spend.
rc=0
limit=$((BUDGET - (SECONDS - START) - RESERVE))
if ((limit > 600)); then limit=600; fi
step "bench: $SHAPE, $DTYPE on $DEVICE, relay slices $SHARDS in-process, results in $OUT" "$limit" \
    "$PY" -m qwen_relay.bench.relay --model "$MODEL" --out "$OUT" --device "$DEVICE" --dtype "$DTYPE" --no-ray \
    --shards "$SHARDS" --baselines hf "${WORKLOAD[@]}" "$@" || rc=$?
what_finished "$rc" "$OUT"

# 4. Tensor parallelism: one slice at TP 1 and TP $TP in the same run, single stream only (hf's figures are in
#    step 3's table); the bench puts rank r of the group on GPU r. Its own table: $OUT/tp/table.md.
tp_rc=0
if ((TP > 1)); then
    step "bench: tensor parallel 1,$TP, one slice, single stream, results in $OUT/tp" "$TP_BUDGET" \
        "$PY" -m qwen_relay.bench.relay --model "$MODEL" --out "$OUT/tp" --device "$DEVICE" --dtype "$DTYPE" \
        --no-ray "${WORKLOAD[@]}" "$@" --shards 1 --tensor-parallel "1,$TP" --baselines "" --workloads single \
        || tp_rc=$?
    what_finished "$tp_rc" "$OUT/tp"
fi
echo "== total $((SECONDS - START)) s of a ${BUDGET} s budget"
if ((rc == 0)); then rc=$tp_rc; fi
exit "$rc"
