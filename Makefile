# `make demo` and `make test` work on a fresh clone: they create .venv, install, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out/demo
SIZE   ?= default
export HF_HUB_OFFLINE := 1
# DeepSpeed's accelerator: cpu unless an NVIDIA GPU is there (a cpu engine next to a CUDA
# device exits 2 at start-up); a value in the environment wins
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: install demo test test-all bench clean

install: $(STAMP)

# torch first, alone and pinned: a loose torch (or one pulled by deepspeed/peft) is a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,text]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ptmrec demo --out $(OUT) --size $(SIZE)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not heavy" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/run_all.py --out bench/results

clean:
	rm -rf $(VENV) out .pytest_cache
