# qwen-relay: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: the CPU build of torch first, so the dependency `torch>=2.4` is already met and pip does
# not pull a multi-GB CUDA build. On a GPU machine: make setup TORCH_SPEC=torch (PyPI's CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast lint protos clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/qwen-relay demo

test: setup
	$(BIN)/python -m pytest -q

# The fast tier: everything in-process (no Ray, no subprocesses), in well under a minute.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

# Regenerate the committed stubs after editing protos/qwen_relay/v1/*.proto.
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/qwen_relay/v1/*.proto

clean:
	rm -rf $(VENV) demo-model demo-work .pytest_cache
