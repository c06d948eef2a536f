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

.PHONY: install demo test test-all bench bench-full clean chromium

install: $(STAMP)

# torch first, alone and pinned: a loose torch (or one pulled by deepspeed/peft) is a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,text,scale]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ptmrec demo --out $(OUT) --size $(SIZE)

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -m "not heavy" tests

test-all: $(STAMP) chromium
	$(BIN)/python -m pytest -q tests

# best effort: Debian's chromium for the headless screenshot of `ptmrec report`
# (tests/test_report.py), installed quietly when missing and we are root with apt-get
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium) >/dev/null 2>&1 && test -x /usr/bin/chromium; } \
	  || echo "chromium not installed (needs root and apt-get): the report screenshot test will be skipped"

# every benchmark at its `make bench` size (under 30 minutes here), then bench/README.md;
# bench-full: each at its own defaults, the sizes the docs quote (hours; resumable), heavy tests too
bench: $(STAMP)
	$(BIN)/python bench/run_all.py --out bench/results

bench-full: $(STAMP)
	$(BIN)/python bench/run_all.py --out bench/results --full

clean:
	rm -rf $(VENV) out .pytest_cache
