# qwen-relay: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: the CPU build of torch first, so the dependency `torch>=2.4` is already met and pip does
# not pull a multi-GB CUDA build. On a GPU machine: make setup TORCH_SPEC=torch (PyPI's CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast lint protos gpu-wheels clean

setup: $(VENV)/.installed

# pip installs without byte-compiling: it would compile all 19k files of the venv on one core (about 40 s here,
# half the setup time), though the suite's and the demo's processes import a third of them. Instead one
# process imports what they import (the gateway, the slices, the training job, Ray's node processes), which
# writes those .pyc files (about 20 s); whatever else a later process imports is compiled once, by the first
# (PYTHONDONTWRITEBYTECODE, where the environment sets it, is not passed on to make's commands).
unexport PYTHONDONTWRITEBYTECODE
PRECOMPILED := qwen_relay.server.cli qwen_relay.server.app qwen_relay.server.http qwen_relay.shards.actor \
	qwen_relay.train.job qwen_relay.train.cli qwen_relay.bench.relay qwen_relay.bench.precheck qwen_relay.demo.main \
	qwen_relay.client.aio qwen_relay.checkpoints.synthetic ray.train.torch ray.scripts.scripts ray.dashboard.agent \
	ray._private.log_monitor ray.autoscaler._private.monitor ray._private.runtime_env.agent.main \
	ray.util.client.server.server

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	$(BIN)/python -c 'import importlib, sys; [importlib.import_module(name) for name in sys.argv[1:]]' $(PRECOMPILED)
	@test -n "$$(find $(VENV)/lib -path '*/site-packages/torch/__pycache__/__init__.*.pyc' -print -quit)" || \
		{ echo "no .pyc written (every import would compile from source)"; exit 1; }
	touch $@

demo: setup
	$(BIN)/qwen-relay demo

# Two workers (pytest-xdist), each running whole files in the order tests/conftest.py gives (longest first):
# the slow tests partly wait on Ray and subprocesses starting and stopping, so two at a time use the 2 cores
# CI has better. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST)

# The fast tier: everything in-process (no Ray, no subprocesses), in well under a minute.
test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(BIN)/ruff check .

# Regenerate the committed stubs after editing protos/qwen_relay/v1/*.proto.
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/qwen_relay/v1/*.proto

# The wheels bench/gpu.sh installs on the GPU machine's image (Python 3.12, no network), downloaded and checked
# against bench/wheels/requirements.txt's hashes into bench/wheels/, which git ignores: copy it with the tree.
GPU_WHEELS := bench/wheels
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--require-hashes -r $(GPU_WHEELS)/requirements.txt -d $(GPU_WHEELS)

clean:
	rm -rf $(VENV) demo-model demo-work .pytest_cache
