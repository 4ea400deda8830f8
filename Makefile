# The commands the README quotes. `make install` is idempotent (re-runs only when pyproject changes).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# one torch thread: several times faster for small models on these 2-vCPU machines
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast demo lint toy clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $@

# what CI runs: every test, offline, W&B off
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled $(BIN)/pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled $(BIN)/pytest -q -m "not slow"

# the main job on the embedded default: distil the toy student from the toy teacher
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/trb train

lint: install
	$(BIN)/ruff check trb tests

# rebuild the shipped toy models bit for bit (~15 min on one core)
toy: install
	$(BIN)/trb toy build

clean:
	rm -rf $(VENV) outputs/train outputs/multirun
