# qwen-relay: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: the CPU build of torch first, so the dependency `torch>=2.4` is already met and pip does
# not pull a multi-GB CUDA build. On a GPU machine: make setup TORCH_SPEC=torch (PyPI's CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast lint protos clean

setup: $(VENV)/.installed

# pip installs without byte-compiling, which it does on one core (about 40 s here, half the setup time):
# compileall then writes the same .pyc files on every core. It exits 1 for the few files in the venv that are
# not this Python's syntax (torch's py312 test helpers), which pip's own compile step skips too; whether it
# compiled at all is checked on torch's package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > $(VENV)/compileall.log 2>&1 || true
	@test -n "$$(find $(VENV)/lib -path '*/site-packages/torch/__pycache__/__init__.*.pyc' -print -quit)" || \
		{ echo "compileall wrote no .pyc (every import would compile from source): see $(VENV)/compileall.log"; \
		exit 1; }
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

clean:
	rm -rf $(VENV) demo-model demo-work .pytest_cache
