# The whole set-up on a fresh machine is `make demo` or `make test`: both create the project-local
# virtual environment and install the project through pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARTIFACTS ?= artifacts

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

## the main job end to end: simulate -> train -> export -> score (and print the evaluation table)
demo: $(STAMP)
	$(BIN)/python -m scripts.demo --artifacts $(ARTIFACTS)

## the test suite (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest

## torch eager vs onnxruntime fp32 vs int8, side by side (needs `make demo` first, or trains a small model)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_scorer --artifacts $(ARTIFACTS)

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
