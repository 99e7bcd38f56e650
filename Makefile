# Two commands for a fresh machine: `make run` (install + tandem up) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. Where pip would otherwise take a CUDA build (Linux x86_64 from PyPI), pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install run test lint bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: install
	$(BIN)/tandem up $(ARGS)

test: install
	./scripts/ensure-redis.sh
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m loadtest.bench --quick

# On a GPU machine: install the GPU runtime, the cuda-marked tests, the bench on the GPU (docs/benchmarks.md).
gpu-check: install
	PYTHON=$(BIN)/python bash loadtest/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) .tandem .pytest_cache .ruff_cache *.egg-info
